"""`vl2edge batch --prompts`: every prompt of every page, each page read once, resume keyed by both."""

import json

import pytest
from PIL import Image

from tests import golden
from vl2edge import batch as batch_mod
from vl2edge import cli
from vl2edge.batch import run_batch
from vl2edge.pipeline import load

PROMPTS = ["What is this?", "Name a colour in it.", "Is there text?"]


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.open(golden.REF / "images" / "square_384.png").save(d / "a.png")
    pages = [Image.new("RGB", (300, 400), c) for c in ((250, 250, 250), (200, 30, 30))]
    pages[0].save(d / "doc.pdf", save_all=True, append_images=pages[1:])
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


@pytest.fixture(scope="module")
def pipes():
    cached = load(golden.model_dir("tiny"), backend="torch", dtype="float32", device="cpu")
    plain = load(golden.model_dir("tiny"), backend="torch", dtype="float32", device="cpu", prefix_cache=0)
    return cached, plain


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_prompt_of_every_page_once_each_page_read_once(tmp_path, inputs, pipes, monkeypatch):
    cached, plain = pipes
    renders = []
    real = batch_mod._render
    monkeypatch.setattr(batch_mod, "_render", lambda page, what: renders.append(what) or real(page, what))
    hits = cached.prefix_cache.stats()["hits"]
    counts = run_batch(cached, [str(inputs)], PROMPTS, tmp_path / "out.jsonl", progress=False, max_new_tokens=4)
    rows = _rows(tmp_path / "out.jsonl")
    got = [(r["source"].split("/in/")[1], r["page"], r["prompt"]) for r in rows]
    assert got == [(f, page, p) for f, page in (("a.png", None), ("broken.png", None), ("doc.pdf", 1), ("doc.pdf", 2))
                   for p in PROMPTS]
    assert counts == {"done": 9, "failed": 3, "skipped": 0}
    assert all("cannot read" in r["error"] for r in rows[3:6])
    assert sorted(renders) == ["page 1 of " + str(inputs / "doc.pdf"), "page 2 of " + str(inputs / "doc.pdf")]
    assert cached.prefix_cache.stats()["hits"] - hits >= 6  # the later prompts of each page start from its image
    for p in PROMPTS:  # each line answers as that prompt's own single-prompt job without the cache would
        run_batch(plain, [str(inputs)], p, tmp_path / f"one-{PROMPTS.index(p)}.jsonl", progress=False,
                  max_new_tokens=4)
        alone = {(r["source"], r["page"]): r.get("answer") for r in _rows(tmp_path / f"one-{PROMPTS.index(p)}.jsonl")}
        assert all("prompt" not in r for r in _rows(tmp_path / f"one-{PROMPTS.index(p)}.jsonl"))
        assert {(r["source"], r["page"]): r.get("answer") for r in rows if r["prompt"] == p} == alone


def _cli(tmp_path, inputs, prompts_file, *extra):
    cli.main(["batch", "--model", str(golden.model_dir("tiny")), str(inputs), "--prompts", str(prompts_file),
              "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "2", "--backend", "torch", *extra])
    return _rows(tmp_path / "out.jsonl")


def test_resume_is_keyed_by_page_and_prompt(tmp_path, inputs, capsys):
    first = tmp_path / "prompts.txt"
    first.write_text("\n".join(PROMPTS[:2]) + "\n\n")  # one a line; blank lines skipped
    rows = _cli(tmp_path, inputs, first)
    assert len(rows) == 8
    out = tmp_path / "out.jsonl"
    out.write_text("\n".join(out.read_text().splitlines()[:5]) + "\n")
    more = tmp_path / "prompts.json"
    more.write_text(json.dumps(PROMPTS))  # a JSON list; one prompt more
    again = _cli(tmp_path, inputs, more, "--resume")
    assert "5 already done" in capsys.readouterr().err
    keys = [(r["source"], r["page"], r["prompt"]) for r in again]
    assert len(again) == 12 and len(set(keys)) == 12  # nothing twice, nothing missing


def test_structured_fields_for_every_page_and_prompt(tmp_path, inputs):
    """`--prompts` with `--json-schema`: each (page, prompt) line carries its answer parsed, valid against the
    schema (constrained decoding), the failed file's lines an error instead."""
    prompts, schema = tmp_path / "prompts.txt", tmp_path / "schema.json"
    prompts.write_text("\n".join(PROMPTS[:2]))
    colours = ["red", "white", "grey"]
    schema.write_text(json.dumps({"type": "object", "properties": {"colour": {"enum": colours}},
                                  "required": ["colour"], "additionalProperties": False}))
    rows = _cli(tmp_path, inputs, prompts, "--json-schema", str(schema), "--max-new-tokens", "32")
    assert [(r["page"], r["prompt"]) for r in rows] == [(page, p) for page in (None, None, 1, 2) for p in PROMPTS[:2]]
    for r in rows:
        if "broken.png" in r["source"]:
            assert "error" in r and "json" not in r
        else:
            assert set(r["json"]) == {"colour"} and r["json"]["colour"] in colours, r
            assert json.loads(r["answer"]) == r["json"]


@pytest.mark.parametrize("text, words", [
    ("", "holds 0 prompts"), ("\n\n", "holds 0 prompts"), ("[1, 2]", "list of strings"),
    ("[\"a\", \"b\"", "not valid JSON"), ("same\nsame\n", "twice"),
    ("\n".join(f"p{i}" for i in range(1001)), "give 1 to 1000"), (b"\xff\xfe bad", "not valid UTF-8")])
def test_a_bad_prompts_file_is_one_line_and_exit_2(tmp_path, inputs, capsys, text, words):
    f = tmp_path / "p.txt"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as e:
        _cli(tmp_path, inputs, f)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def test_prompt_options_are_exclusive(tmp_path, inputs, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    with pytest.raises(SystemExit) as e:
        _cli(tmp_path, inputs, f, "--prompt", "x")
    assert e.value.code == 2 and "exactly one of --prompt, --prompt-file and --prompts" in capsys.readouterr().err
