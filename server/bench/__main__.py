"""``python -m server.bench``: see :mod:`server.bench`."""

import sys

from server.bench import main

sys.exit(main())
