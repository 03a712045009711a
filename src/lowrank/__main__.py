"""``python -m lowrank ...`` is the ``lowrank`` command."""

import sys

from lowrank.cli import main

sys.exit(main())
