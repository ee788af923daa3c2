"""Code on the driver that uses Ray: the federated round loop (``federation``), Ray jobs on a
cluster (``jobs``) and the client-count stress harness (``stress``)."""
