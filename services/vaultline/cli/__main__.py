"""`python -m vaultline.cli …`: the same as the `vaultline` command."""

import sys

from . import main

sys.exit(main())
