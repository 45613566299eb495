"""`python -m moe.cli ...` is the `moe` command."""

import sys

from moe.cli import main

sys.exit(main())
