"""``python -m mlxd.bench``: see :mod:`server.bench`."""

import sys

from mlxd.bench import main

sys.exit(main())
