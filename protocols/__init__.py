"""Everything that crosses the wire between coordinator and devices.

Depends on numpy, cryptography and Flower's record types only: both sides (and the
torch-free edge client) import it, so it must stay light.
"""

__version__ = "0.1.0"
