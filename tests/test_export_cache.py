"""The fast CPU default: a float checkpoint on a machine without CUDA runs through an int4-experts ONNX export
built once into a cache — reused, verified, rebuilt when broken, safe under concurrent first runs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import vl2edge
from tests import golden
from vl2edge.errors import InputError
from vl2edge.export_cache import cache_root, entry_for, verify_entry
from vl2edge.onnx_backend import OnnxModel

TINY = golden.model_dir("tiny")
CONV = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VL2EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VL2EDGE_BACKEND", "auto")
    return tmp_path / "cache"


def test_first_run_builds_the_export_once_and_later_runs_reuse_it(cache, tmp_path, capsys):
    src = shutil.copytree(TINY, tmp_path / "m")
    pipe = vl2edge.load(src, device="cpu")
    err = capsys.readouterr().err
    assert isinstance(pipe.backend, OnnxModel) and "first run on the CPU: exporting" in err and str(cache) in err
    entry = entry_for(src)
    assert entry.parent == cache_root() == cache and verify_entry(entry) is None
    assert json.loads((entry / "manifest.json").read_text())["recipe"]["label"] == "int4-experts"
    first = pipe.chat(CONV, max_new_tokens=4).token_ids
    mtime = (entry / "manifest.json").stat().st_mtime_ns
    again = vl2edge.load(src, device="cpu")
    assert "exporting" not in capsys.readouterr().err  # reused
    assert (entry / "manifest.json").stat().st_mtime_ns == mtime
    assert again.chat(CONV, max_new_tokens=4).token_ids == first
    torch_pipe = vl2edge.load(src, device="cpu", backend="torch")
    assert type(torch_pipe.backend).__name__ == "VL2Model"


def test_a_changed_checkpoint_gets_a_new_entry(cache, tmp_path):
    src = shutil.copytree(TINY, tmp_path / "m")
    before = entry_for(src)
    c = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(c, indent=2))  # same model, other bytes: a new key
    assert entry_for(src) != before


def test_a_generated_checkpoint_with_another_seed_gets_a_new_entry(cache, tmp_path):
    from vl2edge import synthetic

    src = synthetic.write_model("test-mha", tmp_path / "g", generated=True, seed=1)
    before = entry_for(src)
    synthetic.write_model("test-mha", src, generated=True, seed=2)
    assert entry_for(src) != before


def test_an_entry_that_does_not_verify_is_rebuilt(cache, tmp_path, capsys):
    src = shutil.copytree(TINY, tmp_path / "m")
    vl2edge.load(src, device="cpu")
    entry = entry_for(src)
    (entry / "image_newline.npy").write_bytes(b"x" * (entry / "image_newline.npy").stat().st_size)  # same size
    assert "sha256" in verify_entry(entry)
    capsys.readouterr()
    pipe = vl2edge.load(src, device="cpu")
    err = capsys.readouterr().err
    assert "does not verify" in err and "rebuilding" in err
    assert verify_entry(entry) is None and pipe.chat(CONV, max_new_tokens=2).token_ids


def test_options_of_the_torch_backend_keep_it(cache):
    assert type(vl2edge.load(TINY, device="cpu", quant="int8").backend).__name__ == "VL2Model"
    assert type(vl2edge.load(TINY, device="cpu", dtype="float32").backend).__name__ == "VL2Model"
    assert not cache.exists()
    with pytest.raises(InputError, match="unknown backend"):
        vl2edge.load(TINY, backend="tensorflow")
    with pytest.raises(InputError, match="--quant and --gpu-memory"):
        vl2edge.load(TINY, backend="onnx", quant="int8")


def test_two_concurrent_first_runs_share_one_export(tmp_path):
    src = shutil.copytree(TINY, tmp_path / "m")
    env = {**os.environ, "VL2EDGE_CACHE": str(tmp_path / "cache"), "VL2EDGE_BACKEND": "auto"}
    script = textwrap.dedent(f"""
        import vl2edge
        pipe = vl2edge.load({str(src)!r}, device="cpu")
        print(pipe.chat([{{"role": "user", "content": "Hello"}}], max_new_tokens=3).token_ids)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert outs[0][0] == outs[1][0]  # the same answer from the same export
    assert sum("first run on the CPU: exporting" in e for _, e in outs) == 1
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and verify_entry(entries[0]) is None


def test_cli_prints_one_line_saying_what_and_where(cache, tmp_path, capsys):
    from vl2edge import cli

    src = shutil.copytree(TINY, tmp_path / "m")
    cli.main(["run", "--model", str(src), "--prompt", "Hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "exporting" in line]
    assert len(lines) == 1 and str(entry_for(src)) in lines[0] and "--backend torch" in lines[0]


def test_vision_sessions_start_from_the_optimized_graph_cache(cache, tmp_path):
    """The first session of a vision graph writes its optimized, prepacked form; later sessions load that,
    compute the same features, and a damaged entry is rebuilt."""
    import numpy as np

    from vl2edge.ort_cache import GRAPH
    from vl2edge.ort_cache import entry_for as optimized_entry

    src = shutil.copytree(TINY, tmp_path / "m")
    entry = entry_for(src)
    vl2edge.load(src, device="cpu")  # builds the export
    manifest = json.loads((entry / "manifest.json").read_text())
    graph = manifest["graphs"][manifest["default_vision"]]["file"]  # what encode_tiles runs
    optimized = optimized_entry(manifest["files"][graph])
    pixels = golden.processor_outputs("square_384")["images"][0]
    plain = OnnxModel(entry, cache_sessions=False).encode_tiles(pixels)
    assert not optimized.exists()
    first = OnnxModel(entry).encode_tiles(pixels)  # writes the entry
    assert (optimized / GRAPH).is_file() and (optimized / (GRAPH + ".data")).is_file()
    second = OnnxModel(entry).encode_tiles(pixels)  # starts from it
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    (optimized / GRAPH).write_bytes(b"garbage")
    np.testing.assert_array_equal(OnnxModel(entry).encode_tiles(pixels), plain)
    assert (optimized / GRAPH).stat().st_size > 100  # rebuilt
