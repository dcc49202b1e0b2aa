"""``python -m melrecon.reconstruct``: see :mod:`melrecon.reconstruct`."""

import sys

from melrecon.reconstruct.cli import main

sys.exit(main())
