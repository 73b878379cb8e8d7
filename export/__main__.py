"""`python -m vl2edge.export ...` is `vl2edge export ...` (the arguments live in vl2edge/cli.py)."""

import sys

from vl2edge.cli import main

if __name__ == "__main__":
    main(["export", *sys.argv[1:]])
