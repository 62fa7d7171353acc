"""`python -m parloop.gpucheck OUTDIR [--part ...] [--dry-run]`: what `scripts/gpu-check.sh` runs."""

import sys

from parloop.gpucheck.command import main

sys.exit(main())
