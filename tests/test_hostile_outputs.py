"""Hostile artifacts, destinations and arguments: export manifests and quantization.json, quantize/export
destinations that exist, overlap the source, are files, run out of space; sizes, ports and counts typed
on the command line; the Python API. Each case: exit status 2 / a VL2Error naming the problem, and the
user's files untouched."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

import vl2edge
from tests import golden
from vl2edge import cli
from vl2edge.errors import CheckpointError, ConfigError, InputError, VL2Error
from vl2edge.export.build import export
from vl2edge.quant.convert import convert
from vl2edge.quant.recipes import Recipe

TINY = golden.model_dir("tiny")


_cli = golden.cli_error


def _tree(d) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    return export(TINY, tmp_path_factory.mktemp("x") / "f32", "float32", progress=False)


# -- ONNX export manifests -------------------------------------------------------------------------------------

MANIFEST_EDITS = [
    (lambda m: m["graphs"]["decoder"].update(file="../../etc/passwd"), "not a file name inside"),
    (lambda m: m["graphs"]["decoder"].update(file=["decoder.onnx"]), "file must be a string"),
    (lambda m: m["graphs"].pop("decoder"), "no 'decoder'"),
    (lambda m: m.update(graphs=[1, 2]), "graphs must be a JSON object"),
    (lambda m: m["graphs"]["decoder"]["cache"].update(sequence_axis=7), "sequence_axis"),
    (lambda m: m["graphs"]["decoder"].update(past=[1, 2]), "past must be a list of names"),
    (lambda m: m["tensors"].update(embed_tokens="/dev/zero"), "not a file name inside"),
    (lambda m: m.update(min_onnxruntime=123), "min_onnxruntime"),
    (lambda m: m.update(format="vl2edge.onnx.v999"), "is not a vl2edge ONNX export"),
    (lambda m: m["sizes"].update({"decoder.onnx": m["sizes"]["decoder.onnx"] + 1}), "the manifest says"),
]


@pytest.mark.parametrize("edit,message", MANIFEST_EDITS)
def test_hostile_export_manifests(onnx_export, tmp_path, capsys, edit, message):
    d = shutil.copytree(onnx_export, tmp_path / "x")
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi", "--max-new-tokens", "1")
    assert message in err


def test_swapped_export_files_are_refused_and_verify_names_them(onnx_export, tmp_path, capsys):
    d = shutil.copytree(onnx_export, tmp_path / "x")
    a, b = (d / "image_newline.npy").read_bytes(), (d / "view_seperator.npy").read_bytes()
    (d / "image_newline.npy").write_bytes(b)
    (d / "view_seperator.npy").write_bytes(a)  # same sizes: only the sha256 check can tell
    err = _cli(capsys, "verify", d)
    assert "image_newline.npy" in err and "view_seperator.npy" in err and "sha256" in err
    (d / "decoder.onnx").write_bytes((d / "decoder.onnx").read_bytes()[:-10])  # a different size: load refuses
    assert "decoder.onnx has" in _cli(capsys, "run", "--model", d, "--prompt", "hi")


def test_verify_passes_good_artifacts_and_checkpoints(onnx_export, capsys):
    cli.main(["verify", str(onnx_export)])
    cli.main(["verify", str(TINY)])
    out = capsys.readouterr().out
    assert "all" in out and "files match manifest.json" in out and "float checkpoint" in out


def test_verify_finds_a_checkpoint_cut_short(tmp_path, capsys):
    d = shutil.copytree(TINY, tmp_path / "m")
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    assert "truncated" in _cli(capsys, "verify", d)


@pytest.mark.parametrize("text,message", [
    ('{"format": "vl2edge.packed.v1", "tensors": [1]}', "tensors must be a JSON object"),
    ('{"format": "vl2edge.packed.v1", "tensors": {"a.weight": {"bits": 3, "block_size": 32, "symmetric": true}}}',
     "bits must be 4 or 8"),
    ('{"format": "vl2edge.packed.v1", "tensors": {"a.weight": {"bits": 4, "block_size": "32", "symmetric": true}}}',
     "block_size"),
    ('{"format": "vl2edge.packed.v1", "tensors": {"a.weight": {"bits": 4, "block_size": 32}}}', "symmetric"),
    ('{"format": "other"}', "unknown quantization format"),
    ("[" * 10000, "nested too deeply"),
])
def test_hostile_quantization_json(tmp_path, capsys, text, message):
    q = convert(TINY, tmp_path / "q", Recipe("int8"), progress=False)
    (q / "quantization.json").write_text(text)
    err = _cli(capsys, "run", "--model", q, "--prompt", "hi")
    assert message in err and "quantization.json" in err


# -- destinations ----------------------------------------------------------------------------------------------

def test_quantize_refuses_a_destination_with_files_and_deletes_nothing(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"mine")
    (dst / "notes.txt").write_text("keep me")
    before = _tree(dst)
    assert "already holds files" in _cli(capsys, "quantize", TINY, dst, "--recipe", "int8")
    assert _tree(dst) == before
    cli.main(["quantize", str(TINY), str(dst), "--recipe", "int8", "--overwrite"])
    assert (dst / "quantization.json").is_file() and not (dst / "notes.txt").exists()
    assert not list(tmp_path.glob(".dst.*"))  # no temporary directories left behind


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_outputs_may_not_overlap_the_source(tmp_path, capsys, where):
    src = shutil.copytree(TINY, tmp_path / "m")
    before = _tree(src)
    dst = {"same": src, "inside": src / "out", "parent": tmp_path}[where]
    assert "overlaps the input" in _cli(capsys, "quantize", src, dst, "--recipe", "int8", "--overwrite")
    assert "overlaps the input" in _cli(capsys, "export", "--model", src, "--out", dst, "--recipe", "float32",
                                        "--overwrite")
    assert _tree(src) == before


def test_destination_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _cli(capsys, "quantize", TINY, f, "--recipe", "int8")
    assert "is a file" in _cli(capsys, "quantize", TINY, f / "sub", "--recipe", "int8")
    assert "too long" in _cli(capsys, "quantize", TINY, tmp_path / ("n" * 300), "--recipe", "int8")


def test_export_into_a_directory_with_subdirectories_is_refused(tmp_path, capsys):
    dst = tmp_path / "x"
    (dst / "sub").mkdir(parents=True)
    assert "already holds files" in _cli(capsys, "export", "--model", TINY, "--out", dst, "--recipe", "float32")
    assert [p.name for p in dst.iterdir()] == ["sub"]


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_a_full_disk_leaves_nothing_behind(tmp_path, command):
    """RLIMIT_FSIZE stands in for a full disk (we run as root, so permissions cannot): the write fails,
    the command says so in one line with status 2, and neither the destination nor a temporary is left."""
    dst = tmp_path / "dst"
    args = [command, str(TINY), str(dst), "--recipe", "int8"] if command == "quantize" else \
        [command, "--model", str(TINY), "--out", str(dst), "--recipe", "float32"]
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from vl2edge.cli import main
        main({args!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "file-size limit" in r.stderr and "Traceback" not in r.stderr
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


# -- sizes, ports, counts, keys on the command line --------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["info", "--model", "deepseek-vl2-tiny", "--gpu-memory", "0"], "positive size"),
    (["info", "--model", "deepseek-vl2-tiny", "--gpu-memory", "1e400"], "positive size"),
    (["info", "--model", "deepseek-vl2-tiny", "--gpu-memory", "NaN"], "positive size"),
    (["info", "--model", "deepseek-vl2-tiny", "--ram", "inf GiB"], "positive size"),
    (["info", "--model", "deepseek-vl2-tiny", "--ram=-3GiB"], "positive size"),
    (["info", "--model", "deepseek-vl2-tiny", "--context", "-5"], "outside [1,"),
    (["info", "--model", "deepseek-vl2-tiny", "--context", "1e9"], "not an integer"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--gpu-memory", "1e400"], "positive size"),
    (["serve", "--model", str(TINY), "--port", "99999"], "outside [1, 65535]"),
    (["serve", "--model", str(TINY), "--max-tokens", "0"], "outside [1,"),
    (["serve", "--model", str(TINY), "--max-queue", "-1"], "outside [1,"),
    (["serve", "--model", str(TINY), "--api-key", ""], "API key is empty"),
    (["serve", "--model", str(TINY), "--api-key", "   "], "API key is empty"),
    (["run", "--model", "x" * 300, "--prompt", "hi"], "too long"),
    (["run", "--model", str(TINY), "--prompt", "hi \udcff there"], "not valid UTF-8"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--temperature", "nan"], "temperature"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--top-p", "inf"], "top_p"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--seed", "one"], "seed"),
])
def test_hostile_arguments(capsys, args, message):
    assert message in _cli(capsys, *args)


def test_empty_api_key_from_the_environment_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("VL2EDGE_API_KEY", "")
    assert "API key is empty" in _cli(capsys, "serve", "--model", TINY)


# -- the Python API ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(TINY, device="cpu")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"gpu_memory": "1e400"}, InputError, "positive size"),
    ({"gpu_memory": float("nan")}, InputError, "positive size"),
    ({"gpu_memory": True}, InputError, "memory size"),
    ({"dtype": "float8"}, InputError, "unknown dtype"),
    ({"quant": "int3"}, ConfigError, "unknown recipe"),
])
def test_hostile_load_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        vl2edge.load(TINY, device="cpu", **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": float("inf")}, "top_p"), ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"seed": 1.5}, "seed"), ({"max_new_tokens": 10**30}, None), ({"stop": [5]}, "stop"),
])
def test_hostile_generation_arguments(pipe, kwargs, message):
    conv = [{"role": "user", "content": "Hello"}]
    if message is None:  # a huge budget is clipped to the context, not an error
        assert pipe.chat(conv, **kwargs | {"max_new_tokens": 3}).finish_reason in ("stop", "length")
        return
    with pytest.raises(InputError, match=message):
        pipe.chat(conv, **kwargs)


def test_an_empty_stop_string_does_not_empty_the_answer(pipe):
    conv = [{"role": "user", "content": "Hello"}]
    plain = pipe.chat(conv, max_new_tokens=4)
    for stop in ("", [""], ["", ""]):
        assert pipe.chat(conv, max_new_tokens=4, stop=stop).text == plain.text


@pytest.mark.parametrize("content", ["\ud800", "a\udfffb", "ok" + "\udc80"])
def test_lone_surrogates_in_prompts_are_refused(pipe, content):
    with pytest.raises(InputError, match="not valid UTF-8"):
        pipe.chat([{"role": "user", "content": content}], max_new_tokens=1)


def test_every_error_is_a_vl2error():
    assert all(issubclass(e, VL2Error) for e in (CheckpointError, ConfigError, InputError))


def test_a_prompt_file_that_is_not_utf8(tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_bytes(b"Transcribe \xff\xfe the text.")
    err = _cli(capsys, "batch", "--model", TINY, golden.REF / "images" / "square_384.png", "--prompt-file", f,
               "--out", tmp_path / "out.jsonl")
    assert "prompt.txt" in err and "UTF-8" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_the_temporary_of_a_killed_run_is_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".q.partial-{dead}"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    convert(TINY, tmp_path / "q", Recipe("int8"), progress=False)
    assert not stale.exists() and (tmp_path / "q" / "quantization.json").is_file()
