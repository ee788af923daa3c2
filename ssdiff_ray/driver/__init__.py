"""Code on the driver that uses Ray: starting or joining Ray (``session``), one run from
config to summary (``run``), its round loop (``federation``), Ray jobs on a cluster
(``jobs``), the client-count stress harness (``stress``) and Ray tasks for distillation
(``distill``)."""
