"""`python -m vl2edge.quant SRC DST ...` is `vl2edge quantize SRC DST ...` (the arguments live in vl2edge/cli.py)."""

import sys

from vl2edge.cli import main

if __name__ == "__main__":
    main(["quantize", *sys.argv[1:]])
