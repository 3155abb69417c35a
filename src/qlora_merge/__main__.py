"""`python -m qlora_merge` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
