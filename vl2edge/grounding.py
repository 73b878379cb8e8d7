"""Grounding boxes: parse `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` spans, draw them.

DeepSeek-VL2 writes box coordinates as integers in 0..999 relative to the original image's width and
height; pixels are `int(v / 999 * W)` as in the reference's demo
(`deepseek_vl2/serve/app_modules/utils.py`, `parse_ref_bbox`). The
parser never evaluates model output (the reference `eval`s it): it reads numbers with a regular
expression, keeps every well-formed box and reports what it could not read instead of failing.
`save_drawing` writes the picture with its boxes (`--draw OUT`) whole or not at all, never through a link.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

SPAN = re.compile(r"(?:<\|ref\|>(?P<label>.*?)<\|/ref\|>\s*)?<\|det\|>(?P<body>.*?)(?:<\|/det\|>|$)", re.S)
BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


@dataclass
class Box:
    label: str
    norm: tuple[int, int, int, int]                      # as the model wrote it, 0..999
    pixels: tuple[int, int, int, int] | None = None      # in the original image, when its size is known
    image: int | None = None                             # index of the image the box refers to

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Grounding:
    boxes: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse(text: str, image_sizes: list[tuple[int, int]] | None = None) -> Grounding:
    """Boxes in `text`; with `image_sizes`, pixel boxes on the last image (where the reference draws)."""
    out = Grounding()
    size = image_sizes[-1] if image_sizes else None
    for m in SPAN.finditer(text):
        label, body = (m.group("label") or "").strip(), m.group("body")
        if not m.group(0).endswith("<|/det|>"):
            out.problems.append(f"unterminated <|det|> span: {m.group(0)[:60]!r}")
        boxes = BOX.findall(body)
        leftover = BOX.sub("", body).strip(" ,[]\n\t")
        if leftover:
            out.problems.append(f"unreadable text in a box list: {leftover[:60]!r}")
        if not boxes:
            out.problems.append(f"no box in span for {label!r}")
        for b in boxes:
            vals = [float(v) for v in b]
            if any(v < 0 or v > 999 for v in vals):
                out.problems.append(f"coordinates outside 0..999 clamped: {b}")
            x1, y1, x2, y2 = (int(min(max(v, 0), 999)) for v in vals)
            if x1 > x2 or y1 > y2:
                out.problems.append(f"corners swapped: {b}")
                x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
            px = None
            if size is not None:
                W, H = size
                px = (int(x1 / 999 * W), int(y1 / 999 * H), int(x2 / 999 * W), int(y2 / 999 * H))
            out.boxes.append(Box(label, (x1, y1, x2, y2), px, len(image_sizes) - 1 if image_sizes else None))
    return out


COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
          (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def draw(image, boxes: list[Box], width: int = 3):
    """A copy of `image` (PIL) with each box drawn in a colour per label and its label above it."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    d = ImageDraw.Draw(img)
    colors: dict[str, tuple] = {}
    for b in boxes:
        if b.pixels is None:
            continue
        color = colors.setdefault(b.label, COLORS[len(colors) % len(COLORS)])
        x1, y1, x2, y2 = b.pixels
        d.rectangle([x1, y1, x2, y2], outline=color, width=width)
        if b.label:
            tx, ty = x1, max(0, y1 - 14)
            tw = d.textlength(b.label)
            d.rectangle([tx, ty, tx + tw + 4, ty + 13], fill=color)
            d.text((tx + 2, ty), b.label, fill=(255, 255, 255))
    return img


def draw_format(out: str) -> str:
    """The picture format `--draw OUT` names by its suffix; a link or a non-file there is refused (checked
    before the model loads, and again when writing)."""
    from pathlib import Path

    from PIL import Image

    from .errors import InputError
    from .outputs import refuse_link

    kind = Image.registered_extensions().get(Path(out).suffix.lower())
    if kind is None:
        raise InputError(f"cannot write {out}: name a picture file (.png, .jpg, ...) for --draw")
    refuse_link(Path(out))
    return kind


def save_drawing(image, boxes: list[Box], out: str) -> None:
    """`image` with `boxes` drawn, written to `out` in the format its suffix names."""
    import io

    from .errors import InputError
    from .outputs import write_file

    kind = draw_format(out)
    picture = io.BytesIO()
    try:
        draw(image, boxes).save(picture, format=kind)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write {out}: {e}") from None
    write_file(out, picture.getvalue())
