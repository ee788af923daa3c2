"""The public API.

``run(cfg)`` trains a federated DDPM and returns its summary; ``ray_session(address)``
starts (or joins) the Ray it runs on; ``config.load`` makes a ``Config``.

    from ssdiff_ray import api, config
    summary = api.run(config.load("my.toml", ["rounds=8"]))
"""

from ssdiff_ray.config import Config, load
from ssdiff_ray.driver.run import run
from ssdiff_ray.driver.session import ray_session
from ssdiff_ray.errors import UserError

__all__ = ["Config", "UserError", "load", "ray_session", "run"]
