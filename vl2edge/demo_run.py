"""`make demo`: draw two fresh pictures, ask the trained demo model about them, say whether it is right.

    python -m vl2edge.demo_run --model models/trained-tiny --out models/demo

A number to read (number.png) and a red square to point at (shapes.png) are drawn with a fresh seed
(`demo_tasks.demo_pictures`); the model answers through the same pipeline as `vl2edge run` (on a CPU:
the int4-experts ONNX export, built once into the cache); the box is drawn on shapes-box.png. Each
answer is judged as the semantic suite judges it: the exact number, and a box at IoU >= 0.5 with the
square drawn. A wrong answer is the model's limit, not an error: the exit status is 0 once both answers
are in, 2 for bad input (a missing model, an unwritable folder).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from . import demo_tasks
from .errors import VL2Error

if TYPE_CHECKING:
    from .pipeline import Pipeline

COMMANDS = ('vl2edge run --model {model} --image {out}/number.png --prompt "{number}"',
            'vl2edge run --model {model} --image {out}/shapes.png --prompt "{ground}" --draw {out}/shapes-box.png')


def _verdict(right: bool) -> str:
    return "right" if right else "wrong"


def show(model: Path, out: Path, seed: int | None = None, log=print, pipe: Pipeline | None = None) -> dict[str, bool]:
    """Draw, ask `model` (or the `pipe` given), judge and print; returns whether each answer was right."""
    from .grounding import parse, save_drawing
    from .pipeline import load

    seed = random.randrange(2**31) if seed is None else seed
    drawn = demo_tasks.demo_pictures(out, seed)
    pipe = pipe or load(model)
    number_png, shapes_png = out / "number.png", out / "shapes.png"
    with Image.open(number_png) as number_image:
        said = pipe.chat([{"role": "user", "content": f"<image>\n{demo_tasks.NUMBER_PROMPT}"}],
                         [number_image.convert("RGB")], max_new_tokens=12).text.strip()
    number_right = said == drawn["number"]
    log(f"{number_png}: {drawn['number']} is written there; the model read {said!r}: {_verdict(number_right)}")

    ref = "the red square"
    with Image.open(shapes_png) as shapes_image:
        picture = shapes_image.convert("RGB")
    answer = pipe.chat([{"role": "user", "content": demo_tasks.grounding_prompt(ref)}], [picture],
                       max_new_tokens=40).text
    boxes = parse(answer, [picture.size]).boxes
    truth = drawn["box"]
    found = boxes[0].pixels if boxes else None
    box_right = found is not None and demo_tasks.iou(found, truth) >= demo_tasks.IOU_OK
    drawing = out / "shapes-box.png"
    save_drawing(picture, boxes[:1], str(drawing))
    if found is not None:
        log(f"{shapes_png}: {ref} is at {truth} px; the model's box is {found} px "
            f"(IoU {demo_tasks.iou(found, truth):.2f}), drawn on {drawing}: {_verdict(box_right)}")
    else:
        log(f"{shapes_png}: {ref} is at {truth} px; the model gave no box ({answer!r}): wrong")
    log("the same from the command line:")
    for c in COMMANDS:
        log("  " + c.format(model=model, out=out, number=demo_tasks.NUMBER_PROMPT,
                            ground=demo_tasks.grounding_prompt(ref).removeprefix("<image>\n")))
    return {"number": number_right, "box": box_right}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.demo_run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/trained-tiny"))
    ap.add_argument("--out", type=Path, default=Path("models/demo"), help="folder for the pictures and the drawing")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh pictures each time")
    a = ap.parse_args(argv)
    try:
        show(a.model, a.out, a.seed)
    except VL2Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"error: cannot write the pictures into {a.out}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
