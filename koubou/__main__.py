"""`python -m koubou` is the `koubou` command."""

import sys

from .cli import main

sys.exit(main())
