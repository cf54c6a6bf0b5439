"""`python -m proassist_edge.cli`: the command line."""

import sys

from proassist_edge.cli import main

sys.exit(main())
