"""The Ray actors: client pools (many virtual clients each, ``client_pool``) and the
parameter server (``parameter_server``). Each module holds the class itself, which runs
without Ray too, and the same class as a Ray actor (``ray.remote(...)``)."""
