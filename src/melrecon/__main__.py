"""``python -m melrecon SUBCOMMAND ...``: the ``melrecon`` command (:mod:`melrecon.cli`)."""

import sys

from melrecon.cli import main

sys.exit(main())
