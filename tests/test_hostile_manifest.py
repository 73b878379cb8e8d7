"""What an export's manifest says is checked against what is there (issue 31, round three): the manifest
is sealed by its own sha256 (manifest.sha256, which the export cache checks: an edited manifest is rebuilt,
not trusted), its graph descriptions are validated (a graph pointed at another graph's file is refused by
name, before or when its session starts), and `vl2edge verify` says what it did not check."""

import json
import shutil

import pytest

from tests import golden
from vl2edge.artifact import SEAL, seal
from vl2edge.export.build import export
from vl2edge.export_cache import verify_entry

TINY = golden.model_dir("tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return export(TINY, tmp_path_factory.mktemp("manifest") / "onnx", "int4-experts", vision="float", progress=False)


def _edited(built, tmp_path, edit, reseal: bool):
    d = shutil.copytree(built, tmp_path / "e")
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=1))
    if reseal:  # a careful forger: the seal matches, the descriptions must still hold
        seal(d)
    return d


def _swap(a: str, b: str):
    def edit(m):
        m["graphs"][a]["file"], m["graphs"][b]["file"] = m["graphs"][b]["file"], m["graphs"][a]["file"]
    return edit


EDITS = {
    "decoder points at the vision graph": _swap("decoder", "vision"),
    "a graph file that is not listed": lambda m: m["graphs"]["vision"].update(file="other.onnx"),
    "a graph file that is not onnx": lambda m: m["graphs"]["vision"].update(file="embed_tokens.npy"),
    "an unknown graph": lambda m: m["graphs"].update(extra=m["graphs"]["vision"]),
    "default vision that is not a graph": lambda m: m.update(default_vision="vision_int4"),
    "decoder inputs reordered": lambda m: m["graphs"]["decoder"]["inputs"].reverse(),
    "vision inputs renamed": lambda m: m["graphs"]["vision"].update(inputs=["pixels"]),
    "decoder outputs renamed": lambda m: m["graphs"]["decoder"].update(
        outputs=["logits_x", *m["graphs"]["decoder"]["outputs"][1:]]),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edited_manifest_is_refused_by_name_and_the_cache_rebuilds_it(built, tmp_path, capsys, name):
    unsealed = _edited(built, tmp_path, EDITS[name], reseal=False)
    assert "manifest.sha256" in verify_entry(unsealed)  # the cache: rebuilt, never trusted
    shutil.rmtree(unsealed)
    d = _edited(built, tmp_path, EDITS[name], reseal=True)
    err = golden.cli_error(capsys, "run", "--model", d, "--prompt", "hi", "--max-new-tokens", "2", one_line=True)
    assert "manifest.json" in err or "graph" in err


def test_verify_says_what_it_did_not_check(built, tmp_path, capsys):
    from vl2edge import cli

    d = shutil.copytree(built, tmp_path / "v")
    cli.main(["verify", str(d)])
    out = capsys.readouterr().out
    assert "match manifest.json, which matches manifest.sha256" in out and "not checked" not in out
    (d / "stray.bin").write_bytes(b"x")
    (d / SEAL).unlink()
    cli.main(["verify", str(d)])
    out = capsys.readouterr().out
    assert "not checked: manifest.json itself" in out and "stray.bin" in out
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {}
    (d / "manifest.json").write_text(json.dumps(m))
    assert "lists no files" in golden.cli_error(capsys, "verify", d, one_line=True)
    seal(d)
    (d / "manifest.json").write_text(json.dumps(m) + " ")
    assert "does not match manifest.sha256" in golden.cli_error(capsys, "verify", d, one_line=True)
