"""The device daemon (``fedtune-client``): a Flower SuperNode with fedtune's ClientApp.

- ``daemon``: reads the device's TOML config, runs and supervises its SuperNode (and the
  warm launcher), restarts what dies, stops cleanly on SIGTERM.
- ``supernode`` / ``supernode_entry``: the exact ``flower-supernode`` command line, with a
  shorter idle poll than Flower's fixed 3 s.
- ``warm_launcher`` (with ``warm_forkserver``, ``warm_child``, ``warm_shim``): a per-device
  fork server that spares each message's ClientApp process the imports of Flower, numpy
  and torch.

What the ClientApp does with the device's settings is :mod:`client.node_policy`.
"""
