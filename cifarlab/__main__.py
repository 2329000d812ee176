"""`python -m cifarlab ...` is the same as `cifarlab ...`."""
import sys

from cifarlab.cli import main

sys.exit(main())
