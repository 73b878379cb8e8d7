"""Batch jobs: one prompt over files, folders and PDFs, results as JSON lines.

Folders are walked (sorted, recursively) for images and PDFs; PDF pages are rendered with pypdfium2.
Each result line carries the source, the page (PDFs), the answer, the grounding boxes and the
timings; a file that cannot be read is reported on its own line with an `error` and the job goes on.
Every line is written whole and flushed to disk before the next item starts, so a killed job loses at
most the item in progress, and `resume` skips the (source, page) pairs the output already holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError, VL2Error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PDF_SCALE = 2.0  # render PDF pages at 144 dpi


def expand(inputs: list[str]) -> list[Path]:
    """Files in command-line order; folders replaced by the images and PDFs they hold (sorted)."""
    out = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | {".pdf"})
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"no such file or folder: {s}")
    return out


def items(path: Path) -> Iterator[tuple[int | None, object]]:
    """(page, image) pairs of one file: page None for an image file, 1.. for PDF pages. Images may be
    an exception instance, reported per item by the caller."""
    if path.suffix.lower() != ".pdf":
        yield None, path
        return
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise InputError("PDF input needs pypdfium2: pip install 'vl2edge[pdf]'") from None
    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as e:
        yield None, InputError(f"cannot read PDF {path}: {e}")
        return
    try:
        for i in range(len(pdf)):
            try:
                yield i + 1, pdf[i].render(scale=PDF_SCALE).to_pil()
            except Exception as e:
                yield i + 1, InputError(f"cannot render page {i + 1} of {path}: {e}")
    finally:
        pdf.close()


def done_keys(out: Path) -> set[tuple[str, int | None]]:
    keys = set()
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                keys.add((r["source"], r.get("page")))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from a killed run: redone
    return keys


def run_batch(pipe, inputs: list[str], prompt: str, out, resume: bool = False, progress: bool = True,
              **gen_kw) -> dict:
    """Answer `prompt` about every image/page; returns counts {"done", "skipped", "failed"}."""
    files = expand(inputs)
    out = Path(out)
    if out.exists() and not resume:
        raise InputError(f"{out} exists; pass --resume to continue it or choose another output")
    out.parent.mkdir(parents=True, exist_ok=True)
    seen = done_keys(out) if resume else set()
    if resume and out.is_file():  # drop a line torn by a killed run; its item is redone
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(out, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="batch")
    content = prompt if "<image>" in prompt else "<image>\n" + prompt
    with open(out, "a", encoding="utf-8") as f:
        for path in files:
            for page, image in items(path):
                key = (str(path), page)
                if key in seen:
                    counts["skipped"] += 1
                    continue
                record: dict[str, object] = {"source": str(path), "page": page}
                try:
                    if isinstance(image, Exception):
                        raise image
                    res = pipe.chat([{"role": "user", "content": content}], [image], **gen_kw)
                    record |= {"answer": res.text, "boxes": [b.as_dict() for b in res.boxes],
                               "finish_reason": res.finish_reason, "timings": res.timings}
                    counts["done"] += 1
                except VL2Error as e:
                    record["error"] = str(e)
                    counts["failed"] += 1
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return counts
