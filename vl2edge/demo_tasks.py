"""The demo model's tasks, rendered with Pillow: examples to train on, held-out examples to score.

Four tasks, each an `Example` (images, user prompt, expected answer):

- `number`: a 3-5 digit number, black on white in Pillow's default font (24-60 px), anywhere on a
  canvas around it (`number_canvas`: margins of 10 px up to half the text's size) -> "What number is
  written here?" -> "4821";
- `wide`: the same question on a wide canvas (400-480 px, at least 2:1: two 384 tiles) with the number
  (40-60 px) in its right half: the answer is only readable at full resolution in the right tile;
- `ground`: a coloured square or circle on a square light picture (`GROUND_FIGURES`: one a picture;
  with one to three the demo model did not learn to tell them apart in the training budget, and on
  pictures of any shape it learned to place boxes more slowly: bench/RESULTS.md) -> the official
  grounding prompt "<|grounding|>Locate <|ref|>the red square<|/ref|> in the image." -> the same ref
  and its box as `<|det|>[[x1, y1, x2, y2]]<|/det|>` in 0..999 coordinates of the image;
- `count`: two images with 1-5 circles each -> "Which image has more circles?" -> "The first image."

`example(task, rng)` draws one; `score(ex, answer)` says whether an answer is right (exact text, or a
box with IoU >= 0.5 against the drawn shape). Every random choice comes from the `rng` passed in, so a
seed names a set of examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .grounding import parse

TASKS = ("number", "wide", "ground", "count")
NUMBER_PROMPT = "What number is written here?"
COUNT_PROMPT = "Which image has more circles?"
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 220), "yellow": (235, 190, 20)}
SHAPES = ("square", "circle")
FONT_SIZES = (24, 60)   # px, inclusive: the range the demo model is trained and scored on
GROUND_FIGURES = (1, 1)  # figures on a grounding picture, inclusive (1-3 was not learned in the budget)
WIDE_FONT_SIZES = (40, 60)  # the wide task's: its digits are not scaled up much (768 / 400-480 px)
IOU_OK = 0.5


@dataclass(frozen=True)
class Example:
    task: str
    images: tuple[Image.Image, ...]
    prompt: str                                   # the user message, <image> placeholders included
    answer: str                                   # what the model should write
    box: tuple[int, int, int, int] | None = None  # grounding: the target's pixel box (x1, y1, x2, y2)


def number_image(value: int, size: int, rng: random.Random, canvas: tuple[int, int] | None = None,
                 right_half: bool = False) -> Image.Image:
    """`value` black on white at font size `size`, at a random place; canvas (w, h) random if not given."""
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = (int(v) for v in font.getbbox(str(value)))
    tw, th = x1 - x0, y1 - y0
    if canvas is None:
        canvas = (rng.randint(max(tw + 8, 256), 384), rng.randint(max(th + 8, 192), 384))
    W, H = canvas
    left = W // 2 if right_half else 0
    x = rng.randint(left + 4, max(left + 4, W - tw - 4)) - x0
    y = rng.randint(4, max(4, H - th - 4)) - y0
    img = Image.new("RGB", (W, H), (255, 255, 255))
    ImageDraw.Draw(img).text((x, y), str(value), fill=(0, 0, 0), font=font)
    return img


def random_number(rng: random.Random) -> int:
    digits = rng.randint(3, 5)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def text_size(value: int, size: int) -> tuple[int, int]:
    """(width, height) of the number's ink box at font size `size`."""
    x0, y0, x1, y1 = (int(v) for v in ImageFont.load_default(size=size).getbbox(str(value)))
    return x1 - x0, y1 - y0


def number_canvas(value: int, size: int, rng: random.Random) -> tuple[int, int]:
    """A canvas (w, h) around the rendered text: margins of 10 px to half the text's size. The demo
    model's tower (12 patches a tile side) reads digits the processor scales up to fill the tile; on a
    page-sized canvas 24 px digits are smaller than a patch (bench/RESULTS.md, 2026-12-04)."""
    tw, th = text_size(value, size)
    return tw + rng.randint(10, tw // 2 + 10), th + rng.randint(10, th // 2 + 10)


def _number(rng: random.Random) -> Example:
    value = random_number(rng)
    size = rng.randint(*FONT_SIZES)
    img = number_image(value, size, rng, canvas=number_canvas(value, size, rng))
    return Example("number", (img,), f"<image>\n{NUMBER_PROMPT}", str(value))


def _wide(rng: random.Random) -> Example:
    value = random_number(rng)
    size = rng.randint(*WIDE_FONT_SIZES)
    W = rng.randint(400, 480)  # wider than a tile and at least 2:1: the processor makes two local tiles
    canvas = (W, rng.randint(text_size(value, size)[1] + 20, W // 2))
    img = number_image(value, size, rng, canvas=canvas, right_half=True)
    return Example("wide", (img,), f"<image>\n{NUMBER_PROMPT}", str(value))


def _place(rng: random.Random, W: int, H: int, side: int, taken: list) -> tuple[int, int, int, int] | None:
    """A free square of `side` px on the canvas, or None after a few tries."""
    for _ in range(50):
        x, y = rng.randint(2, W - side - 2), rng.randint(2, H - side - 2)
        box = (x, y, x + side, y + side)
        if all(box[2] + 4 <= t[0] or t[2] + 4 <= box[0] or box[3] + 4 <= t[1] or t[3] + 4 <= box[1] for t in taken):
            return box
    return None


def shapes_image(rng: random.Random, W: int, H: int, n: int, shapes=SHAPES, colors=tuple(COLORS),
                 side_range: tuple[float, float] = (0.2, 0.4)):
    """A light canvas with up to n distinct (colour, shape) figures; returns (image, [(name, box), ...])."""
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(img)
    kinds = rng.sample([(c, s) for c in colors for s in shapes], n)
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for color, shape in kinds:
        side = int(min(W, H) * rng.uniform(*side_range))
        box = _place(rng, W, H, side, [b for _, b in placed])
        if box is None:
            continue
        if shape == "square":
            d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[color])
        else:
            d.ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[color])
        placed.append((f"the {color} {shape}", box))
    return img, placed


def grounding_prompt(ref: str) -> str:
    return f"<image>\n<|grounding|>Locate <|ref|>{ref}<|/ref|> in the image."


def _ground(rng: random.Random, figures: tuple[int, int] = GROUND_FIGURES) -> Example:
    W = H = rng.randint(192, 384)  # square: the picture fills the tile, so 0..999 is a place in it (RESULTS)
    img, placed = shapes_image(rng, W, H, rng.randint(*figures))
    ref, box = placed[rng.randrange(len(placed))]
    norm = [round(v * 999 / s) for v, s in zip(box, (W, H, W, H))]
    return Example("ground", (img,), grounding_prompt(ref),
                   f"<|ref|>{ref}<|/ref|><|det|>[[{norm[0]}, {norm[1]}, {norm[2]}, {norm[3]}]]<|/det|>", box)


def _circles(rng: random.Random, n: int) -> Image.Image:
    W, H = rng.randint(192, 320), rng.randint(192, 320)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    taken: list = []
    while len(taken) < n:
        box = _place(rng, W, H, int(min(W, H) * rng.uniform(0.12, 0.2)), taken)
        if box is None:  # crowded: start again
            return _circles(rng, n)
        taken.append(box)
        d.ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[rng.choice(tuple(COLORS))])
    return img


def _count(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 6), 2)
    which = "first" if a > b else "second"
    return Example("count", (_circles(rng, a), _circles(rng, b)),
                   f"Image 1: <image>\nImage 2: <image>\n{COUNT_PROMPT}", f"The {which} image.")


_MAKERS = {"number": _number, "wide": _wide, "ground": _ground, "count": _count}


def example(task: str, rng: random.Random) -> Example:
    """One example of `task` (one of TASKS)."""
    return _MAKERS[task](rng)


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(ex: Example, answer: str) -> bool:
    """Exact answer (number, wide, count), or a first box with IoU >= 0.5 against the drawn shape."""
    if ex.box is None:
        return answer.strip() == ex.answer
    boxes = parse(answer, [ex.images[-1].size]).boxes
    return bool(boxes) and boxes[0].pixels is not None and iou(boxes[0].pixels, ex.box) >= IOU_OK


def _save_png(img, path) -> None:
    import io

    from .outputs import write_file

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_file(path, buf.getvalue())  # never through a link


def demo_pictures(out, seed: int | None = None) -> dict:
    """`make demo`'s two fresh pictures in `out`: number.png (a number to read) and shapes.png (a red
    square to point at). Returns what was drawn: {"number": its text, "box": the square's pixel box}."""
    from pathlib import Path

    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    number = _number(rng)
    _save_png(number.images[0], out / "number.png")
    W = H = rng.randint(256, 384)
    img, placed = shapes_image(rng, W, H, 1, shapes=("square",), colors=("red",))
    _save_png(img, out / "shapes.png")
    return {"number": number.answer, "box": placed[0][1]}
