"""`python -m tidar_bench.cli ...` (e.g. under torchrun) == the `tidar-bench` command."""
import sys

from . import main

sys.exit(main())
