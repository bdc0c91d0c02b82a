"""The coordinator service (``fedtune-coordinator``) on Flower's Deployment Engine.

A SuperLink (TLS on by default, SuperNodes authenticated by registered public keys) runs
fedtune's ServerApp; devices run ``fedtune-client`` (:mod:`client.node`).

- ``certs``: a development CA, the SuperLink's TLS certificate, SuperNode key pairs.
- ``superlink``: the exact ``flower-superlink`` command line, started and stopped by PID
  with its process tree (:mod:`protocols.processes`).
- ``fab``: the Flower App folder ``flwr run`` bundles (config only; code comes from the
  installed ``fedtune`` package, weights and data never travel).
- ``flwr_cli``: the ``flwr`` CLI calls against one named SuperLink connection.
- ``coordinator``: ``fedtune-coordinator`` itself: start or attach to a SuperLink, submit
  the run, follow it, resume it.
"""
