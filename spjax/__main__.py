"""`python -m spjax ...`: the `spjax` command (spjax/cli.py), for an environment without its script."""
import sys

from spjax.cli import main

sys.exit(main())
