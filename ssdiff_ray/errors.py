"""The one base of every error a user can fix (config, data, files, addresses, requests).

The command line catches ``UserError`` once and prints its message, one line, exit code 2;
anything else is a bug and raises. Subclasses exist where a caller tells them apart (an HTTP
status, a retry), not to name each module's errors.
"""


class UserError(ValueError):
    """Something a user can fix; the message is one line naming what is wrong."""
