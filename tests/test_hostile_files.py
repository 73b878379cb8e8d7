"""Hostile files, round two: images, batch jobs, PDFs and resume. Every case is a real file made in tmp_path;
each gets one line naming the file and the problem (an InputError, exit status 2, or a batch `error` line
while the job goes on) and never a traceback, and nothing the user has is lost. Plus a seeded mutation fuzz
of the image loader and processor (replay a failure with VL2EDGE_FUZZ_SEED=<seed>)."""

import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

import vl2edge
from tests import golden
from vl2edge import batch, cli
from vl2edge.errors import InputError
from vl2edge.images import load_image
from vl2edge.processor import Processor

TINY = str(golden.model_dir("tiny"))
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),  # fuzzed TIFF tags
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]  # our cap then refuses
SMALL = Image.radial_gradient("L").resize((40, 30)).convert("RGB")


def _enc(fmt: str, img: Image.Image = SMALL, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int) -> bytes:
    """A PNG header declaring w x h over a few bytes of pixel data."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def _patch(data: bytes, at: int, fmt: str, *values) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, *values)
    return bytes(b)


def _tiff_entry(data: bytes, tag: int) -> int:
    """Offset of `tag`'s 12-byte entry in a little-endian TIFF's first IFD."""
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        if struct.unpack_from("<H", data, ifd + 2 + 12 * k)[0] == tag:
            return ifd + 2 + 12 * k
    raise KeyError(tag)


def _tiff_size(w: int, h: int) -> bytes:
    t = _enc("TIFF")
    t = _patch(t, _tiff_entry(t, 256) + 2, "<HII", 4, 1, w)
    return _patch(t, _tiff_entry(t, 257) + 2, "<HII", 4, 1, h)


def _pdf(*boxes: str, count: int | None = None) -> bytes:
    """A PDF written by hand: one page per MediaBox; /Count in the page tree may lie."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(len(boxes)))
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{kids}] /Count {len(boxes) if count is None else count} >>".encode()]
    objs += [f"<< /Type /Page /Parent 2 0 R /MediaBox [{b}] >>".encode() for b in boxes]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode() + b"".join(f"{o:010d} 00000 n \n".encode()
                                                                               for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


_spider = [0.0] * 27
_spider[0], _spider[1], _spider[4], _spider[11], _spider[12], _spider[21], _spider[22] = 1, 4, 1, 4, 1, 16, 16
# name -> (file name, contents, what the message says). Each is a file a user could have.
BAD_IMAGES = {
    "png-truncated": ("cut.png", _enc("PNG", SMALL.resize((400, 300)))[:300], "damaged PNG data"),
    "png-bad-header-crc": ("crc.png", _patch(_enc("PNG"), 29, ">I", 0), "damaged or invalid PNG header"),
    "png-corrupt-idat": ("idat.png", _patch(_enc("PNG"), _enc("PNG").index(b"IDAT") + 6, ">I", 0), "damaged PNG data"),
    "jpeg-truncated": ("cut.jpg", _enc("JPEG")[:400], "damaged JPEG data"),
    "jpeg-soi-only": ("soi.jpg", b"\xff\xd8\xff" + b"\x00" * 40, "JPEG"),
    "tiff-truncated": ("cut.tif", _enc("TIFF")[:60], "TIFF"),
    "tiff-stripoffsets-ascii": ("type.tif", _patch(_enc("TIFF"), _tiff_entry(_enc("TIFF"), 273) + 2, "<H", 2),
                                "damaged TIFF data (TypeError"),
    "gif-truncated": ("cut.gif", _enc("GIF", SMALL.convert("P"))[:40], "GIF"),
    "webp-truncated": ("cut.webp", _enc("WEBP")[:30], "cannot read"),
    "bmp-truncated": ("cut.bmp", _enc("BMP")[:100], "damaged BMP data"),
    "text-named-jpg": ("text.jpg", b"I am not a picture\n", "not a PNG, JPEG, WEBP, BMP, GIF or TIFF image"),
    "empty-file": ("empty.png", b"", "not a PNG, JPEG"),
    "pdf-named-png": ("doc.png", _pdf("0 0 300 400"), "not a PNG, JPEG"),
    "dds-header": ("x.dds", b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44 +
                   struct.pack("<2I4s5I", 32, 4, b"DX10", 0, 0, 0, 0, 0) + b"\0" * 20 +
                   struct.pack("<5I", 999, 3, 0, 1, 0), "not a PNG, JPEG"),  # old loader: NotImplementedError
    "spider-header": ("x.spi", struct.pack(">27f", *_spider) + b"\0" * 64, "not a PNG, JPEG"),
    "im-header": ("x.im", b"Image type: RGB image\r\nImage size (x*y): 0*4\r\n\x1a" + b"\0" * 600, "not a PNG"),
    "fli-header": ("x.fli", struct.pack("<IHHHHH", 144, 0xAF11, 1, 0, 0, 8) + b"\0" * 140, "not a PNG"),
    "png-zero-size": ("zero.png", _png(0, 0), "invalid PNG header"),
    "bmp-zero-width": ("zero.bmp", _patch(_enc("BMP"), 18, "<ii", 0, 4), "invalid BMP header"),
    "png-bomb": ("bomb.png", _png(60000, 60000), "too large to decode safely"),
    "png-over-cap": ("big.png", _png(9000, 9000), "81,000,000 pixels, more than the 80,000,000"),
    "jpeg-bomb": ("bomb.jpg", _patch(_enc("JPEG"), _enc("JPEG").index(b"\xff\xc0") + 5, ">HH", 65000, 65000),
                  "too large to decode safely"),
    "gif-bomb": ("bomb.gif", _patch(_enc("GIF", SMALL.convert("P")), 6, "<HH", 65535, 65535), "too large"),
    "tiff-bomb": ("bomb.tif", _tiff_size(100000, 100000), "too large"),
    "bmp-bomb": ("bomb.bmp", _patch(_enc("BMP"), 18, "<ii", 30000, 30000), "too large"),
}


def _tree(t: Path) -> Path:
    """Path troubles in `t`: a folder and a FIFO named like images, a file to go through, odd names."""
    (t / "d.png").mkdir()
    os.mkfifo(t / "pipe.png")
    (t / "a.png").write_bytes(_enc("PNG"))
    for name in ("two\nlines.png", os.fsdecode(b"caf\xff.png")):
        (t / name).write_bytes(b"garbage")
    return t


BAD_PATHS = {
    "missing": ("missing.png", "image not found"),
    "directory": ("d.png", "image path is a directory"),
    "fifo": ("pipe.png", "not a regular file"),
    "long-component": ("x" * 300 + ".png", "a name in the path is too long"),
    "through-a-file": ("a.png/b.png", "a part of the path is a file"),
    "nul-byte": ("a\x00.png", "cannot open image"),
    "newline-in-name": ("two\nlines.png", "two\\nlines.png"),
    "undecodable-name": (os.fsdecode(b"caf\xff.png"), "caf\\udcff.png"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_files(tmp_path, case):
    name, data, message = BAD_IMAGES[case]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError) as e:
        load_image(tmp_path / name)
    text = str(e.value)
    assert message in text and name in text and "\n" not in text, text


@pytest.mark.parametrize("case", BAD_PATHS)
def test_bad_image_paths(tmp_path, case):
    rel, message = BAD_PATHS[case]
    with pytest.raises(InputError) as e:
        load_image(f"{_tree(tmp_path)}/{rel}")
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 500, str(e.value)


GOOD = {"png-named-jpg": ("PNG", {}), "gif-animated": ("GIF", {"save_all": True, "append_images": [SMALL]}),
        "jpeg-cmyk": ("JPEG", {"mode": "CMYK"}), "png-16bit": ("PNG", {"mode": "I;16"}),
        "png-la": ("PNG", {"mode": "LA"}), "tiff-1bit": ("TIFF", {"mode": "1"}),
        "webp-lossless": ("WEBP", {"lossless": True}), "bmp": ("BMP", {})}


@pytest.mark.parametrize("case", GOOD)
def test_odd_but_valid_images_load(tmp_path, case):
    fmt, kw = GOOD[case][0], dict(GOOD[case][1])
    img = SMALL.convert(kw.pop("mode", "RGB"))
    (tmp_path / "x.jpg").write_bytes(_enc(fmt, img, **kw))
    assert load_image(tmp_path / "x.jpg").mode == "RGB"


def test_pixel_cap_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded past the cap"))
    with pytest.raises(InputError, match="too large"):
        load_image(_png(9000, 9000))


# -- the CLI and the batch job ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(TINY, device="cpu", dtype="float32")


@pytest.fixture
def fast_cli(monkeypatch, pipe):
    monkeypatch.setattr(cli, "_load", lambda a: pipe)


def _cli(capsys, *args) -> str:
    return golden.cli_error(capsys, *args, one_line=True)


def _batch(capsys, out, *inputs, resume=False) -> tuple[list[dict], str]:
    cli.main(["batch", "--model", TINY, *map(str, inputs), "--prompt", "What?", "--out", str(out),
              "--max-new-tokens", "1", *(["--resume"] if resume else [])])
    return [json.loads(line) for line in Path(out).read_bytes().splitlines()], capsys.readouterr().err


@pytest.mark.parametrize("case", ["bomb.tif", "type.tif", "x.dds", "cut.jpg"])
def test_run_with_a_bad_image_exits_2(tmp_path, capsys, fast_cli, case):
    name, data, message = next(v for v in BAD_IMAGES.values() if v[0] == case)
    (tmp_path / name).write_bytes(data)
    assert message in _cli(capsys, "run", "--model", TINY, "--image", tmp_path / name, "--prompt", "hi")


def test_batch_goes_on_past_every_bad_file(tmp_path, capsys, fast_cli):
    d = tmp_path / "in"
    d.mkdir()
    for name, data, _ in BAD_IMAGES.values():
        (d / name).write_bytes(data)
    (d / "good.png").write_bytes(_enc("PNG"))
    os.mkfifo(d / "pipe.png")
    rows, err = _batch(capsys, tmp_path / "o.jsonl", d)
    by_name = {Path(r["source"]).name: r for r in rows}
    assert "answer" in by_name.pop("good.png") and "answer" in by_name.pop("doc.png")  # a PDF, whatever its name
    assert by_name["pipe.png"]["error"].startswith("image path is not a regular file")
    for name, _, message in BAD_IMAGES.values():
        if name in by_name:  # .dds/.spi/.im/.fli are not picked up from folders
            assert message in by_name[name]["error"] and name in by_name[name]["error"], by_name[name]
    assert f"2 answered, {len(by_name)} failed" in err and len(by_name) == len(BAD_IMAGES) - 4
    _, err = _batch(capsys, tmp_path / "o.jsonl", d, resume=True)  # error lines count as done
    assert f"0 answered, 0 failed, {len(by_name) + 2} already done" in err


def test_resume_matches_the_file_not_the_spelling(tmp_path, capsys, fast_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(_enc("PNG"))
    (tmp_path / "b.png").write_bytes(_enc("PNG"))
    rows, _ = _batch(capsys, "o.jsonl", "a.png")
    assert rows[0]["source"] == "a.png" and rows[0]["source_path"] == os.path.realpath(tmp_path / "a.png")
    old = {"source": "b.png", "page": None, "answer": "from an older vl2edge"}  # no source_path
    Path("o.jsonl").write_text(Path("o.jsonl").read_text() + json.dumps(old) + "\n")
    rows, err = _batch(capsys, "o.jsonl", tmp_path / "a.png", "./b.png", "a.png", resume=True)
    assert len(rows) == 2 and "0 answered, 0 failed, 3 already done" in err


@pytest.fixture(scope="module")
def two_lines(tmp_path_factory, pipe):
    """A finished two-item job whose second source name holds a two-byte UTF-8 character."""
    d = tmp_path_factory.mktemp("job")
    for name in ("a.png", "café.png"):
        (d / name).write_bytes(_enc("PNG"))
    batch.run_batch(pipe, [str(d / "a.png"), str(d / "café.png")], "What?", d / "o.jsonl", progress=False,
                    max_new_tokens=1)
    return d, (d / "o.jsonl").read_bytes().splitlines(keepends=True)


def _torn(lines):
    second = lines[1]
    return {"mid-json": lines[0] + second[:len(second) // 2],
            "inside-utf8-char": lines[0] + second[:second.index("é".encode()) + 1],
            "no-newline": lines[0] + second[:-1],
            "inside-prefix": lines[0] + b'{"sou',
            "unparsable-last-line": lines[0] + second[:40] + b"\n"}


@pytest.mark.parametrize("case", ["mid-json", "inside-utf8-char", "no-newline", "inside-prefix",
                                  "unparsable-last-line"])
def test_resume_cuts_a_torn_last_line_and_redoes_it(tmp_path, capsys, fast_cli, two_lines, case):
    d, lines = two_lines
    out = tmp_path / "o.jsonl"
    out.write_bytes(_torn(lines)[case])
    rows, err = _batch(capsys, out, d / "a.png", d / "café.png", resume=True)
    assert "torn last line" in err and "1 answered, 0 failed, 1 already done" in err
    assert [r["source"] for r in rows] == [str(d / "a.png"), str(d / "café.png")]
    assert out.read_bytes().startswith(lines[0]) and out.read_bytes().endswith(b"}\n")


@pytest.mark.parametrize("case,tail,message", [
    ("torn-middle-line", None, "line 1 is not valid JSON"),
    ("foreign-middle-line", b"{}\n", "line 1 is not a vl2edge result line"),
    ("foreign-last-line", b"\x89PNG garbage", "line 3 is not valid JSON"),
    ("invalid-utf8-middle", b"\xff\xfe\n", "line 1 is not valid JSON"),
])
def test_resume_refuses_to_drop_a_line_it_did_not_write(tmp_path, capsys, fast_cli, two_lines, case, tail, message):
    d, lines = two_lines
    out = tmp_path / "o.jsonl"
    data = lines[0][:30] + b"\n" + lines[1] if tail is None else \
        (tail + b"".join(lines) if "middle" in case else b"".join(lines) + tail)
    out.write_bytes(data)
    err = _cli(capsys, "batch", "--model", TINY, d / "a.png", "--prompt", "x", "--out", out, "--resume")
    assert message in err and str(out) in err
    assert out.read_bytes() == data


@pytest.mark.parametrize("rel,message", [
    (".", "is a folder"), ("a.png/o.jsonl", "a part of the path is a file"),
    ("pipe.png", "is not a regular file"), ("o" * 300 + "/o.jsonl", "a name in the path is too long"),
], ids=["directory", "under-a-file", "fifo", "long-component"])
def test_bad_out_paths_exit_2(tmp_path, capsys, fast_cli, rel, message):
    _tree(tmp_path)
    assert message in _cli(capsys, "batch", "--model", TINY, tmp_path / "a.png", "--prompt", "x", "--out",
                           f"{tmp_path}/{rel}", "--resume")
    assert (tmp_path / "a.png").read_bytes() == _enc("PNG")


def test_a_file_size_limit_mid_job_keeps_whole_lines(tmp_path, capsys, fast_cli):
    for n in range(4):
        (tmp_path / f"{n}.png").write_bytes(_enc("PNG"))
    inputs, out = [str(tmp_path / f"{n}.png") for n in range(4)], tmp_path / "o.jsonl"
    script = (f"import resource; from vl2edge import cli; resource.setrlimit(resource.RLIMIT_FSIZE, (900, 900)); "
              f"cli.main(['batch', '--model', {TINY!r}, *{inputs!r}, '--prompt', 'x', '--out', {str(out)!r}, "
              "'--max-new-tokens', '1'])")
    r = subprocess.run([sys.executable, "-B", "-c", script], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write {out}: a file would exceed the file-size limit" in r.stderr and "--resume" in r.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < len(data) <= 900
    assert all("answer" in json.loads(line) for line in data.splitlines())
    rows, err = _batch(capsys, out, *inputs, resume=True)
    assert len(rows) == 4 and "already done" in err


def test_a_full_disk_mid_line_leaves_whole_lines(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data[:7]))  # part of the line fits, then the disk is full
        raise OSError(28, "No space left on device")
    with batch.ResultWriter(out) as w:
        w.write({"source": "a.png", "page": None, "answer": "ok"})
        monkeypatch.setattr(os, "write", full_disk)
        with pytest.raises(InputError, match=f"cannot write {out}: no space left on the device.*--resume"):
            w.write({"source": "b.png", "page": None, "answer": "ok"})
        monkeypatch.undo()
    assert out.read_bytes() == b'{"source": "a.png", "page": null, "answer": "ok"}\n'


PDFS = {
    "lying-count": (_pdf("0 0 300 400", count=1_000_000), "doc.pdf", [(1, None), (2, "pages 2-1000000")]),
    "huge-page": (_pdf("0 0 100000 100000", "0 0 300 400"), "doc.pdf",
                  [(1, "100000x100000 points at 144 dpi) is too large"), (2, None)]),
    "truncated": (_pdf("0 0 300 400")[:200], "doc.pdf", [(None, "cannot read PDF")]),
    "named-png": (_pdf("0 0 300 400"), "doc.png", [(1, None)]),
    "png-named-pdf": (_enc("PNG"), "photo.pdf", [(None, None)]),  # recognised by content, not by name
    "text-named-pdf": (b"hello", "notes.pdf", [(None, "notes.pdf")]),
    "over-the-page-cap": (_pdf("0 0 300 400", "0 0 300 400"), "doc.pdf", [(1, None), (2, "at most 1 pages")]),
}


@pytest.mark.parametrize("case", PDFS)
def test_hostile_pdfs_get_error_lines_and_the_job_goes_on(tmp_path, pipe, monkeypatch, case):
    data, name, expected = PDFS[case]
    monkeypatch.setattr(batch, "MAX_PDF_PAGES", 1 if case == "over-the-page-cap" else batch.MAX_PDF_PAGES)
    (tmp_path / name).write_bytes(data)
    (tmp_path / "z.png").write_bytes(_enc("PNG"))
    batch.run_batch(pipe, [str(tmp_path / name), str(tmp_path / "z.png")], "What?", tmp_path / "o.jsonl",
                    progress=False, max_new_tokens=1)
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["page"] for r in rows[:-1]] == [page for page, _ in expected]
    for r, (_, want) in zip(rows, expected):
        assert ("answer" in r) if want is None else (want in r["error"] and name in r["error"]), r
    assert rows[-1]["source"].endswith("z.png") and "answer" in rows[-1]


def test_undecodable_file_names_are_written_and_resumed(tmp_path, capsys, fast_cli):
    d = os.fsencode(tmp_path / "in")
    os.mkdir(d)
    Path(os.fsdecode(os.path.join(d, b"caf\xff.png"))).write_bytes(_enc("PNG"))
    rows, _ = _batch(capsys, tmp_path / "o.jsonl", tmp_path / "in")
    assert rows[0]["source"].endswith("caf\udcff.png") and "answer" in rows[0]
    _, err = _batch(capsys, tmp_path / "o.jsonl", tmp_path / "in", resume=True)
    assert "1 already done" in err


@pytest.mark.parametrize("args,message", [
    (["--prompt", "caf\udcff"], "the prompt is not valid UTF-8"),
    (["{t}/" + "x" * 300 + ".png", "--prompt", "x"], "a name in the path is too long"),
    (["{t}/a.png/b.png", "--prompt", "x"], "a part of the path is a file"),
], ids=["surrogate-prompt", "long-input", "input-through-a-file"])
def test_bad_batch_arguments_exit_2(tmp_path, capsys, fast_cli, args, message):
    (tmp_path / "a.png").write_bytes(_enc("PNG"))
    args = [a.replace("{t}", str(tmp_path)) for a in args]
    assert message in _cli(capsys, "batch", "--model", TINY, tmp_path / "a.png", *args, "--out", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("data,message", [
    (b"Transcribe \xff\xfe the text", r"p.txt is not valid UTF-8 text \(byte 11\)"),
    (b"x" * (batch.MAX_PROMPT_FILE_BYTES + 1), "is over 1,048,576 bytes"),
    (None, "cannot read --prompt-file: file path is a directory"),
], ids=["invalid-utf8", "huge", "directory"])
def test_bad_prompt_files(tmp_path, data, message):
    """For `vl2edge batch --prompt-file` (cli.batch is to call batch.read_prompt_file)."""
    if data is None:
        (tmp_path / "p.txt").mkdir()
    else:
        (tmp_path / "p.txt").write_bytes(data)
    with pytest.raises(InputError, match=message):
        batch.read_prompt_file(tmp_path / "p.txt")
    (tmp_path / "ok.txt").write_text("  Transcribe the text.\n")
    assert batch.read_prompt_file(tmp_path / "ok.txt") == "Transcribe the text."


# -- chat ---------------------------------------------------------------------------------------------------

def test_chat_survives_bad_bytes_and_bad_images(tmp_path, capsys, fast_cli, pipe, monkeypatch):
    bad = tmp_path / "type.tif"
    bad.write_bytes(BAD_IMAGES["tiff-stripoffsets-ascii"][1])
    (tmp_path / "good.png").write_bytes(_enc("PNG"))
    script = (f"caf\xc3 \xff\xfe broken\n/image {bad}\n/image {tmp_path}\n/image {tmp_path / ('x' * 300)}\n"
              f"/image {tmp_path / 'good.png'}\nWhat is it?\n/quit\n").encode("latin-1")
    stdin = io.TextIOWrapper(io.BytesIO(script), encoding="utf-8")
    seen = []
    real = pipe.generation
    monkeypatch.setattr(pipe, "generation", lambda m, i, **kw: seen.append(len(i)) or real(m, i, **kw))
    cli.chat(cli._parser().parse_args(["chat", "--model", TINY, "--max-new-tokens", "1"]), stdin=stdin)
    err = capsys.readouterr().err
    assert "that message is not valid UTF-8" in err and "damaged TIFF data (TypeError" in err
    assert "image path is a directory" in err and "a name in the path is too long" in err
    assert "attached" in err and "Traceback" not in err and seen == [1]


# -- the mutation fuzz --------------------------------------------------------------------------------------

def _fuzz_samples() -> dict[str, bytes]:
    p = SMALL.convert("P")
    kinds = {"png": ("PNG", SMALL, {}), "png-p": ("PNG", p, {"transparency": 0}),
             "png-16": ("PNG", SMALL.convert("I;16"), {}),
             "jpeg": ("JPEG", SMALL, {}), "jpeg-prog": ("JPEG", SMALL, {"progressive": True}),
             "webp": ("WEBP", SMALL, {}), "webp-ll": ("WEBP", SMALL, {"lossless": True}), "bmp": ("BMP", SMALL, {}),
             "gif": ("GIF", p, {}), "gif-anim": ("GIF", p, {"save_all": True, "append_images": [p.rotate(90)]}),
             "tiff": ("TIFF", SMALL, {}), "tiff-lzw": ("TIFF", SMALL, {"compression": "tiff_lzw"}),
             "tiff-jpeg": ("TIFF", SMALL, {"compression": "jpeg"}), "tiff-p": ("TIFF", p, {"compression": "packbits"})}
    return {k: _enc(fmt, img, **kw) for k, (fmt, img, kw) in kinds.items()}


def _mutate(rng: random.Random, data: bytes, tiff: bool) -> bytes:
    """Flip, insert, overwrite with extreme integers, delete or truncate a few bytes, mostly in the headers;
    TIFFs mostly get their IFD entries retagged, retyped, recounted or repointed (where Pillow raised
    TypeError and OverflowError)."""
    b = bytearray(data)
    ifd_only = tiff and rng.random() < 0.7
    for _ in range(rng.randint(1, 4)):
        if ifd_only:
            ifd = struct.unpack_from("<I", data, 4)[0]
            e = ifd + 2 + 12 * rng.randrange(struct.unpack_from("<H", data, ifd)[0])
            retype = (2, "<H", rng.choice([0, 2, 5, 7, 11, 12, 13, 99]))
            field, fmt, value = rng.choice([
                (0, "<H", rng.choice([256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 338, 530, 34665])),
                retype, retype, (4, "<I", rng.choice([0, 2, 1000, 2**31, 2**32 - 1])),
                (8, "<I", rng.choice([0, 7, 2**16, 2**31, 2**32 - 1, rng.randrange(len(data))]))])
            struct.pack_into(fmt, b, e + field, value)
            continue
        if not b:
            break
        i = rng.randrange(min(len(b), 256) if rng.random() < 0.6 else len(b))
        op = rng.randrange(5)
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            b[i:i + 4] = rng.choice([b"\xff" * 4, b"\x00" * 4, b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"])
        elif op == 3:
            del b[i:i + rng.randint(1, 16)]
        else:
            del b[rng.randint(8, max(8, len(b))):]
    return bytes(b)


def _fuzz(n: int, seed: int) -> None:
    print(f"image fuzz: {n} mutants, seed {seed} (replay: VL2EDGE_FUZZ_SEED={seed})")
    rng, samples = random.Random(seed), _fuzz_samples()
    proc = Processor.from_pretrained(TINY)
    failures, decoded = [], 0
    kinds = sorted(samples) + [k for k in samples if k.startswith("tiff")] * 2  # TIFF: the most fields to break
    for k in range(n):
        kind = rng.choice(kinds)
        mutant = _mutate(rng, samples[kind], kind.startswith("tiff"))
        try:
            img = load_image(mutant, max_pixels=4_000_000)  # small cap: a mutant declaring 80 MP would be slow
            assert img.mode == "RGB"
            if decoded < 50:  # what decodes, however odd its size, also goes through the processor
                proc([{"role": "user", "content": "<image>"}], [img])
            decoded += 1
        except InputError as e:
            assert "\n" not in str(e)
        except Exception as e:  # a decoder exception that escaped: the bug this fuzz is for
            failures.append(f"mutant {k} of {kind}: {type(e).__name__}: {e}")
    assert not failures, f"seed {seed}: " + "; ".join(failures[:5])


def test_image_mutation_fuzz_fast():
    _fuzz(2000, int(os.environ.get("VL2EDGE_FUZZ_SEED", "20240611")))


@pytest.mark.slow
def test_image_mutation_fuzz_long():
    _fuzz(200_000, int(os.environ.get("VL2EDGE_FUZZ_SEED", random.SystemRandom().randrange(2**32))))
