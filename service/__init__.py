"""The generation service on Ray Serve (``ssdiff serve``) and its load test (``ssdiff loadtest``).

Thin: the model, the defense, request checks and the planner live in ``ssdiff_ray.serving``.
"""
