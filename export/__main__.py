"""python -m export --model SRC --out DST [--recipe int4-experts|int8|int4|float32] [--block-size 32]
[--vision both|float|int8] [--accuracy-level 4]"""

import argparse
import json
import sys

from vl2edge.errors import VL2Error

from .build import EXPORT_RECIPES, export


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m export", description="Quantize a DeepSeek-VL2 checkpoint "
                                 "(directory or Hugging Face id) and export it to ONNX for vl2edge's CPU backend.")
    ap.add_argument("--model", required=True, help="float checkpoint directory or Hugging Face id")
    ap.add_argument("--out", required=True, help="artifact directory to write")
    ap.add_argument("--recipe", default="int4-experts", choices=EXPORT_RECIPES,
                    help="float32 = plain ops, for verification; the others as in python -m quant")
    ap.add_argument("--block-size", type=int, default=32, choices=[32, 64, 128])
    ap.add_argument("--vision", default="both", choices=["both", "float", "int8"],
                    help="vision graph variants to write (int8: the tower's linears as 8-bit MatMulNBits)")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 4],
                    help="MatMulNBits/QMoE accuracy_level: 4 = int8 activations (fast on CPU), 0 = exact")
    a = ap.parse_args(argv)
    try:
        out = export(a.model, a.out, a.recipe, a.block_size, a.vision, a.accuracy_level)
    except VL2Error as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    m = json.loads((out / "manifest.json").read_text())
    print(f"wrote {out} ({a.recipe}, {m['export_seconds']} s); verification against torch: "
          + ", ".join(f"{k} rel-L2 {v['rel_l2']:.1e}" for k, v in m["verification"].items()))


if __name__ == "__main__":
    main()
