"""``python -m simulations.audit``: the same as ``fedtune audit``."""

import sys

from simulations.audit.run import main

sys.exit(main())
