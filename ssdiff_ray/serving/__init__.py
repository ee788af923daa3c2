"""Serving a run's model (no Ray here; ``service/`` puts it on Ray Serve):

* ``request``: a ``POST /generate`` body, checked (one 4xx message per problem);
* ``profile``: FID and server time against sampler and steps (``ssdiff serve-profile``);
* ``planner``: the cheapest sampler, steps and place (device or edge server) within a budget;
* ``generator``: the model with its cached defense, generating batches of requests.
"""
