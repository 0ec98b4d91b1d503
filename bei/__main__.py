"""`python -m bei`: the `bei` command."""

import sys

from bei.cli import main

sys.exit(main())
