"""`python -m internvl_mpo <command>`: the same entry point as the `internvl-mpo` script."""

import sys

from internvl_mpo.cli import main

sys.exit(main())
