"""Deployment on Flower's Deployment Engine: a SuperLink (the coordinator) and SuperNodes
(the devices) as real processes, TLS on by default and SuperNodes authenticated by
registered public keys.

- ``certs``: a development CA, the SuperLink's TLS certificate, SuperNode key pairs.
- ``processes`` / ``superlink`` / ``supernode``: the exact Flower command lines, started
  and stopped by PID with their whole process tree.
- ``fab``: the Flower App folder ``flwr run`` bundles (config only; code comes from the
  installed ``fedtune`` package, weights and data never travel).
- ``coordinator`` / ``client_daemon``: ``fedtune coordinator`` and ``fedtune client``.
- ``warm_clientapp`` (with ``warm_forkserver``, ``warm_child``, ``warm_shim``): the warm
  ClientApp launcher, a per-device fork server that spares each message's ClientApp
  process the imports of Flower, numpy and torch.
"""
