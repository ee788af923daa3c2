"""The generation service: a run's model with its defense, behind HTTP on Ray Serve.

Without Ray (tests call these directly):

* ``request``: a ``POST /generate`` body, checked (one 4xx message per problem);
* ``profile``: FID and server time against sampler and steps (``ssdiff serve-profile``);
* ``offload``: the cheapest sampler, steps and place (device or edge server) within a budget;
* ``generator``: the model with its cached defense, generating batches of requests.

On Ray Serve: ``app`` (the ``GenerationService`` deployment and its app builder),
``loadtest`` (the HTTP load test) and ``cli`` (``ssdiff serve``, ``serve-profile``,
``loadtest``).
"""
