"""vl2edge batch (files, folders, PDFs, resume, bad files), chat (the REPL) and info."""

import io
import json

import pytest
from PIL import Image

from tests import golden
from vl2edge import cli


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    Image.open(golden.REF / "images" / "square_384.png").save(d / "a.png")
    Image.open(golden.REF / "images" / "multi_b_640x480.png").convert("RGB").save(d / "sub" / "b.jpg")
    pages = [Image.new("RGB", (300, 400), c) for c in ((250, 250, 250), (200, 30, 30))]
    pages[0].save(d / "doc.pdf", save_all=True, append_images=pages[1:])
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "notes.txt").write_text("ignored: not an image")
    return d


def _batch(tmp_path, inputs, *extra):
    cli.main(["batch", "--model", str(golden.model_dir("tiny")), str(inputs), "--prompt", "What is this?",
              "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "3", *extra])
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_batch_over_a_folder_with_a_pdf_and_a_bad_file(tmp_path, inputs, capsys):
    rows = _batch(tmp_path, inputs)
    keys = [(r["source"].split("/in/")[1], r["page"]) for r in rows]
    assert keys == [("a.png", None), ("broken.png", None), ("doc.pdf", 1), ("doc.pdf", 2), ("sub/b.jpg", None)]
    assert "cannot read" in rows[1]["error"] and "answer" not in rows[1]
    good = [r for r in rows if "answer" in r]
    assert len(good) == 4 and all(r["timings"]["new_tokens"] == 3 and "boxes" in r for r in good)
    assert rows[2]["answer"] != rows[3]["answer"] or rows[2]["timings"] != rows[3]["timings"]
    assert "4 answered, 1 failed" in capsys.readouterr().err


def test_batch_resume_skips_what_is_done(tmp_path, inputs, capsys):
    rows = _batch(tmp_path, inputs)
    out = tmp_path / "out.jsonl"
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # killed mid-line
    with pytest.raises(SystemExit):
        _batch(tmp_path, inputs)  # refuses to overwrite without --resume
    again = _batch(tmp_path, inputs, "--resume")
    assert "3 answered, 0 failed, 2 already done" in capsys.readouterr().err
    done = [r for r in again if "answer" in r or "error" in r]
    assert sorted((r["source"], r["page"]) for r in done) == sorted((r["source"], r["page"]) for r in rows)


def test_chat_repl(monkeypatch, capsys, tmp_path):
    img = golden.REF / "images" / "square_384.png"
    script = io.StringIO(f"/image {tmp_path / 'missing.png'}\n/image {img}\nWhat is it?\nAnd now?\n/reset\nHi\n/quit\n")
    a = cli._parser().parse_args(["chat", "--model", str(golden.model_dir("tiny")), "--max-new-tokens", "3"])
    seen = []
    real = cli._load

    def spy(args):
        pipe = real(args)
        gen = pipe.generation

        def record(messages, images, **kw):
            seen.append((len(messages), len(images)))
            return gen(messages, images, **kw)
        pipe.generation = record
        return pipe
    monkeypatch.setattr(cli, "_load", spy)
    cli.chat(a, stdin=script)
    err = capsys.readouterr().err
    assert "image not found" in err and f"attached {img}" in err and "conversation cleared" in err
    # turn 1: one message, one image; turn 2: history (3 messages), the same image; after /reset: fresh
    assert seen == [(1, 1), (3, 1), (1, 0)]


def test_info_from_config_alone(capsys):
    cli.main(["info", "--model", "deepseek-vl2-small", "--gpu-memory", "12GiB", "--ram", "24GiB"])
    out = capsys.readouterr().out
    assert "16.13B parameters (2.88B active per token)" in out
    assert "| int4-experts |" in out and "offloaded:" in out and "experts per layer on the GPU" in out
    cli.main(["info", "--model", str(golden.model_dir("base"))])
    assert "MLA attention, 12 routed experts (top-4)" in capsys.readouterr().out
