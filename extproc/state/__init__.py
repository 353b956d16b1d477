"""Where what the picker learns lives when more than one process decides: shared through Redis.

- ``records``: the wire format of a batch of picks (pure);
- ``connect``: a Redis client from ``state:`` (standalone, TLS, Cluster or Sentinel; secrets from a file or
  the environment);
- ``replicator``: publishes this replica's picks and applies the others', in the background.
"""
