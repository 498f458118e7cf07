"""`python -m convserve` is the `convserve` command."""

import sys

from .cli import main

sys.exit(main())
