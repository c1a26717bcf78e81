"""``python -m mlxd.bench``: see :mod:`mlxd.bench.cli`."""

import sys

from mlxd.bench.cli import main

sys.exit(main())
