"""The one base of every error a user can fix (config, data, files, addresses, requests).

The command line catches ``UserError`` once and prints its message, one line, exit code 2;
anything else is a bug and raises. Subclasses exist where a caller tells them apart (an HTTP
status, a retry), not to name each module's errors.
"""

import re


class UserError(ValueError):
    """Something a user can fix; the message is one line naming what is wrong."""


class RunStopped(Exception):
    """Raised by an ``on_round`` callback to stop a run on purpose (a pruned tuning trial):
    trackers mark the run KILLED, not FAILED."""


def redact(text: str) -> str:
    """Every ``//user:password@`` in ``text`` (a URL, or a message holding one) with the
    password replaced by ***: storage and tracking URLs are printed, their secrets not."""
    return re.sub(r"(//[^/:@\s]*:)[^@/\s]*@", r"\1***@", text)
