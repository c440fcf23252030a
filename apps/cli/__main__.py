"""`python -m apps.cli`: the `tandem` command."""

import sys

from apps.cli.main import main

sys.exit(main())
