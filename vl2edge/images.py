"""Image decoding for every entry point (run, chat, batch, the server, the Python API); no torch, no numpy.

`load_image(src)` turns a file path, the file's bytes or a PIL image into an RGB picture, or raises an
`InputError` that names the source and the problem. What vl2edge accepts:

- Formats: PNG, JPEG (MPO included), WEBP, BMP, GIF (first frame) and TIFF (first page), recognised
  from the content whatever the file is called. Pillow is asked for these decoders only
  (`Image.open(formats=FORMATS)`), so its exotic ones (DDS, SPIDER, IM, FLI, PSD, EPS, ...) never run
  on a user's file.
- Size: at most `MAX_IMAGE_PIXELS` (width × height), checked from the header before a pixel is
  decoded; zero-size images are refused.
- Anything raised while opening, decoding or converting a picture means a bad picture: fuzzed files
  make decoders raise TypeError, struct.error, EOFError, IndexError, ZeroDivisionError, MemoryError...
  as well as OSError, and each becomes one `InputError`.
- Paths: a missing file, a directory, something that is not a regular file (a FIFO would block),
  permission denied, a component over 255 bytes, a path through a file: an `InputError` with the reason.

`open_file` (the path checks) and `check_size` (the pixel cap) are shared with batch's PDF pages.
Pillow's warnings about damaged data and large images are silenced process-wide (a filter set on import):
the InputError or the pixel cap says it in one line instead.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .outputs import os_reason

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # Pillow format ids vl2edge decodes
SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})  # found in folders
MAX_IMAGE_PIXELS = 80_000_000  # e.g. 10000x8000; 240 MB as RGB. Below Pillow's own warning threshold (89.5 M)
MAX_NAME_CHARS = 300           # longer names are shown shortened in messages
_MAGIC = (("PNG", 0, b"\x89PNG"), ("JPEG", 0, b"\xff\xd8\xff"), ("GIF", 0, b"GIF8"), ("BMP", 0, b"BM"),
          ("TIFF", 0, b"II*\x00"), ("TIFF", 0, b"MM\x00*"), ("WEBP", 8, b"WEBP"))  # (format, offset, signature)

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def display_name(path) -> str:
    """A path as one printable line: control characters and undecodable bytes escaped, long names cut."""
    name = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not name.isprintable():
        name = repr(name)[1:-1]
    if len(name) > MAX_NAME_CHARS:
        half = MAX_NAME_CHARS // 2
        name = f"{name[:half]}...{name[-half:]} ({len(name)} characters)"
    return name


def open_file(path, kind: str = "image") -> BinaryIO:
    """`path` opened for reading as binary; an InputError naming it (and `kind`) when it cannot be."""
    name = display_name(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{kind} not found: {name}") from None
    except IsADirectoryError:
        raise InputError(f"{kind} path is a directory: {name}") from None
    except OSError as e:
        raise InputError(f"cannot open {kind} {name}: {os_reason(e)}") from None
    except (ValueError, TypeError) as e:  # an embedded NUL byte, a path of the wrong type
        raise InputError(f"cannot open {kind} {name}: {e}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{kind} path is a directory: {name}")
    raise InputError(f"{kind} path is not a regular file: {name}")


def check_size(width: float, height: float, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a picture of zero size or with more than `max_pixels` pixels, before it is decoded."""
    if not (width >= 1 and height >= 1):  # also NaN
        raise InputError(f"{name} has zero size ({width:g}x{height:g})")
    if width * height > max_pixels:
        raise InputError(f"{name} is too large to decode safely: {width:.0f}x{height:.0f} is "
                         f"{width * height:,.0f} pixels, more than the {max_pixels:,} vl2edge accepts")


def load_image(src, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, or the file's bytes; InputError for anything bad."""
    if isinstance(src, Image.Image):
        return _decode(src, "the image", max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _open_and_decode(io.BytesIO(src), "image bytes", max_pixels)
    if isinstance(src, (str, os.PathLike)):
        with open_file(src, "image") as f:
            return _open_and_decode(f, display_name(src), max_pixels)
    raise InputError(f"an image must be a PIL image, a file path or bytes, not {type(src).__name__}")


def _open_and_decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(fp, formats=FORMATS)
    except UnidentifiedImageError:
        fmt = _sniff(fp)
        if fmt:  # Pillow's decoder for it refused the header (a zero size, a bad field)
            raise InputError(f"cannot read {name}: damaged or invalid {fmt} header") from None
        raise InputError(f"cannot read {name}: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from None
    except Exception as e:
        raise _bad(name, _sniff(fp), e) from None
    with img:
        return _decode(img, name, max_pixels)


def _sniff(fp: BinaryIO) -> str | None:
    """The accepted format a file's first bytes announce, to name it when Pillow's decoder gives up."""
    try:
        fp.seek(0)
        head = fp.read(16)
    except Exception:
        return None
    return next((f for f, at, magic in _MAGIC if head[at:at + len(magic)] == magic), None)


def _decode(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    try:
        check_size(img.width, img.height, name, max_pixels)  # the header's size, before any pixel is decoded
        img.load()
        check_size(img.width, img.height, name, max_pixels)  # a decoder may settle the size while loading
        return img.convert("RGB")
    except InputError:
        raise
    except Exception as e:
        raise _bad(name, img.format, e) from None


def _bad(name: str, fmt: str | None, e: BaseException) -> InputError:
    if isinstance(e, Image.DecompressionBombError):
        return InputError(f"{name} is too large to decode safely ({e})")
    detail = " ".join(str(e).split())[:200]
    what = f"damaged {fmt} data" if fmt else "damaged image data"
    return InputError(f"cannot read {name}: {what} ({type(e).__name__}{': ' + detail if detail else ''})")
