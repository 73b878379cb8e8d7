"""python -m quant SRC DST --recipe NAME [--block-size N] [--algorithm rtn|mse] [--symmetric|--asymmetric]
[--vision-int8]"""

import argparse
import sys

from vl2edge.errors import VL2Error
from vl2edge.quantize import RECIPES, Recipe
from vl2edge.weights import disk_size

from .convert import convert


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m quant", description="Quantize a DeepSeek-VL2 checkpoint "
                                 "(a local directory or Hugging Face id) into a model directory vl2edge loads.")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--recipe", required=True, choices=RECIPES,
                    help="int4-experts: routed experts 4-bit, attention/shared/dense/lm_head 8-bit; "
                         "int8: all language-model linears 8-bit; int4: all 4-bit (the router stays float)")
    ap.add_argument("--block-size", type=int, default=32, choices=[32, 64, 128])
    ap.add_argument("--algorithm", default="rtn", choices=["rtn", "mse"])
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="no zero points, also for 4-bit")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="zero points, also for 8-bit")
    ap.add_argument("--vision-int8", action="store_true", help="also quantize the vision tower's linears to 8-bit")
    a = ap.parse_args(argv)
    try:
        recipe = Recipe(a.recipe, a.block_size, a.algorithm, a.symmetric, a.vision_int8)
        out = convert(a.src, a.dst, recipe)
    except VL2Error as e:
        print(f"quant: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"wrote {out} ({recipe.label}, {disk_size(out) / 1e6:,.1f} MB)")


if __name__ == "__main__":
    main()
