"""`python -m qlora_merge` runs the CLI, with its signal handlers in place before the slow imports."""

import sys

from .interrupts import run_console

sys.exit(run_console())
