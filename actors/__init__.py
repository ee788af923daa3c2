"""The Ray actors: client pools (many virtual clients each) and the parameter server.
Each is a thin shell over its core class in ``ssdiff_ray``."""
