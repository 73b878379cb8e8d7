"""Hostile files and arguments, round two: every JSON file we read, every directory we write, every size
we parse. Each case asserts exit status 2 (or the VL2Error subclass) and that the message names the file
or field; none may end in a traceback, and nothing outside the destination is touched."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from tests import golden
from vl2edge.errors import CheckpointError
from vl2edge.weights import SafetensorsFile

TINY = golden.model_dir("tiny")
BOMB = "[" * 100_000 + "]" * 100_000


_cli = golden.cli_error


def _copy(tmp_path):
    return shutil.copytree(TINY, tmp_path / "m")


def _header_file(path, header_text: str, data: bytes = b"\0" * 64):
    h = header_text.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


# -- safetensors headers ---------------------------------------------------------------------------------------

HEADERS = [
    (BOMB, "nested too deeply"),
    ('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', "out of range"),
    ('{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', "out of range"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.5, 4.0]}}', "data_offsets"),
    ('{"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}', "shape[0]"),
    ('{"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 4]}}', "shape[0]"),
    ('{"a": {"dtype": "F32", "shape": {"x": 1}, "data_offsets": [0, 4]}}', "shape must be a list"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', "[begin, end]"),
    ('{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "dtype must be a string"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', "not a number JSON allows"),
    ('{"a": [1, 2, 3]}', "must be a JSON object"),
    ('["a", "b"]', "must be a JSON object"),
    ('{"a": {"dtype": "F32", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], "data_offsets": [0, 4]}}', "at most 8"),
    ('{"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}', "unsupported dtype"),
    ('{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', None),
]


@pytest.mark.parametrize("header,message", HEADERS)
def test_hostile_safetensors_headers(tmp_path, header, message):
    f = _header_file(tmp_path / "x.safetensors", header)
    try:
        SafetensorsFile(f)
    except CheckpointError as e:
        assert str(f) in str(e)
        if message:
            assert message in str(e), str(e)
    else:
        assert message is None  # a surrogate in a tensor name parses; the key check refuses it later


def test_header_that_is_not_utf8(tmp_path):
    f = tmp_path / "x.safetensors"
    h = b'{"\xff\xfe": 1}'
    f.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        SafetensorsFile(f)


def test_float_tensor_relabelled_as_integers_is_refused(tmp_path, capsys):
    d = _copy(tmp_path)
    st = d / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "language.model.norm.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "I32"
    h = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    st.write_bytes(bytes(raw[:8]) + h + bytes(raw[8 + n:]))
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi", "--max-new-tokens", "1")
    assert "wrong dtype" in err and name in err


# -- shard indexes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", ["/etc/passwd", "../m2/model.safetensors", "sub/model.safetensors", "..",
                                   "model.bin", ""])
def test_index_may_not_point_outside_the_model(tmp_path, capsys, shard):
    d = _copy(tmp_path)
    outside = tmp_path / "m2"
    outside.mkdir()
    shutil.copy(d / "model.safetensors", outside / "model.safetensors")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"image_newline": shard}}))
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi")
    assert "not a .safetensors file name in the model directory" in err


@pytest.mark.parametrize("index", [BOMB, '{"weight_map": [1, 2]}', '{"weight_map": {"a": 5}}', "[]",
                                   '{"weight_map": {"a": "' + "x" * 300 + '.safetensors"}}'])
def test_hostile_shard_indexes(tmp_path, capsys, index):
    d = _copy(tmp_path)
    (d / "model.safetensors.index.json").write_text(index)
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi")
    assert "model.safetensors.index.json" in err


# -- config.json -----------------------------------------------------------------------------------------------

CONFIG_EDITS = [
    (lambda c: c["language_config"].update(num_hidden_layers=10_000_000), "num_hidden_layers"),
    (lambda c: c["language_config"].update(vocab_size=2**60), "vocab_size"),
    (lambda c: c["language_config"].update(hidden_size=True), "hidden_size"),
    (lambda c: c["language_config"].update(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (lambda c: c["language_config"].update(rope_theta=0), "rope_theta"),
    (lambda c: c["language_config"].update(first_k_dense_replace=-1), "first_k_dense_replace"),
    (lambda c: c["language_config"].update(n_routed_experts=10**6), "n_routed_experts"),
    (lambda c: c.update(language_config=[1, 2]), "language_config must be an object"),
    (lambda c: c["vision_config"].update(layers=0), "vision_config.layers"),
    (lambda c: c["vision_config"].update(mlp_ratio=1e300), "mlp_ratio"),
    (lambda c: c.update(candidate_resolutions=[[384, 384]] * 1000), "candidate_resolutions"),
    (lambda c: c.update(candidate_resolutions=[[384, -384]]), "candidate_resolutions"),
    (lambda c: c["projector_config"].update(depth=10**9), "projector_config.depth"),
]


@pytest.mark.parametrize("edit,field", CONFIG_EDITS)
def test_hostile_config_values(tmp_path, capsys, edit, field):
    d = _copy(tmp_path)
    c = json.loads((d / "config.json").read_text())
    edit(c)
    (d / "config.json").write_text(json.dumps(c))
    assert field in _cli(capsys, "info", "--model", d)
    assert field in _cli(capsys, "run", "--model", d, "--prompt", "hi")


@pytest.mark.parametrize("text,message", [(BOMB, "nested too deeply"), ('{"rope_theta": NaN}', "JSON allows"),
                                          ('{"language_config": {"rope_theta": 1e400}}', "out of range"),
                                          (b"\xff\xfe{}", "not valid UTF-8")])
def test_hostile_config_json(tmp_path, capsys, text, message):
    d = _copy(tmp_path)
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    err = _cli(capsys, "info", "--model", d)
    assert message in err and "config.json" in err


def test_config_sizes_are_bounded_before_anything_is_allocated(tmp_path):
    """`info` on a config of ten million layers answers at once (no gigabytes of shapes)."""
    d = _copy(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["language_config"]["num_hidden_layers"] = 10_000_000
    (d / "config.json").write_text(json.dumps(c))
    r = subprocess.run([sys.executable, "-m", "vl2edge", "info", "--model", str(d)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "num_hidden_layers" in r.stderr


# -- processor_config.json, tokenizer configs ------------------------------------------------------------------

PROCESSOR_EDITS = [
    ({"candidate_resolutions": [[0, 384]]}, "candidate_resolutions[0]"),
    ({"candidate_resolutions": [[384, 384], [-768, 384]]}, "candidate_resolutions[1]"),
    ({"candidate_resolutions": [[384, 384], [500, 384]]}, "multiple of the tile size 384"),
    ({"candidate_resolutions": [[512, 512]]}, "tile size"),  # the model's tower takes 384
    ({"candidate_resolutions": {"a": 1}}, "candidate_resolutions must be a list"),
    ({"candidate_resolutions": []}, "non-empty"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 numbers"),
    ({"image_mean": ["a", 0.5, 0.5]}, "image_mean"),
    ({"patch_size": 16}, "patch_size is 16 but config.json's model expects 14"),
    ({"patch_size": 0}, "patch_size"),
    ({"downsample_ratio": 3}, "downsample_ratio"),
    ({"image_token": ""}, "image_token"),
    ({"image_token": ["<image>"]}, "image_token"),
    ({"normalize": "yes"}, "normalize"),
]


@pytest.mark.parametrize("edit,message", PROCESSOR_EDITS)
def test_hostile_processor_config(tmp_path, capsys, edit, message):
    d = _copy(tmp_path)
    c = json.loads((d / "processor_config.json").read_text())
    (d / "processor_config.json").write_text(json.dumps(c | edit))
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi", "--max-new-tokens", "1")
    assert message in err and "processor_config.json" in err


def test_processor_config_with_nan_is_refused(tmp_path, capsys):
    d = _copy(tmp_path)
    text = (d / "processor_config.json").read_text()
    (d / "processor_config.json").write_text(text.replace('"image_mean": [', '"image_mean": [NaN, ', 1))
    assert "not a number JSON allows" in _cli(capsys, "run", "--model", d, "--prompt", "hi")


@pytest.mark.parametrize("name,text", [("tokenizer_config.json", "[1, 2]"), ("tokenizer_config.json", BOMB),
                                       ("special_tokens_map.json", '{"bos_token": 1e400}'),
                                       ("tokenizer_config.json", '{"bos_token": "<nope>", "eos_token": "<nope>"}')])
def test_hostile_tokenizer_configs(tmp_path, capsys, name, text):
    d = _copy(tmp_path)
    (d / name).write_text(text)
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi")
    assert name in err or "tokenizer_config.json" in err


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, capsys):
    """Token ids past vocab_size (e.g. an added image token) would index outside the embedding table."""
    d = _copy(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["language_config"]["vocab_size"] = 300
    (d / "config.json").write_text(json.dumps(c))
    err = _cli(capsys, "run", "--model", d, "--prompt", "hi")
    assert "tokenizer has 384 tokens" in err and "vocab_size is 300" in err


@pytest.mark.parametrize("context", [2, 17, 300])
def test_a_context_too_short_for_the_prompt_is_refused_before_the_engine(tmp_path, capsys, context):
    """A small max_position_embeddings: the export (whose verification prompt holds a picture) and a run whose
    prompt is longer say so in one line, naming the limit; onnxruntime's attention never sees it."""
    d = _copy(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["language_config"]["max_position_embeddings"] = context
    (d / "config.json").write_text(json.dumps(c))
    assert "max_position_embeddings" in _cli(capsys, "export", "--model", d, "--out", tmp_path / "o", one_line=True)
    assert not (tmp_path / "o").exists()
    prompt = "word " * context
    for backend in ("torch", "onnx"):
        err = _cli(capsys, "run", "--model", d, "--backend", backend, "--prompt", prompt).strip().splitlines()
        assert [line for line in err if "error" in line] == err[-1:]  # before it only "[vl2edge] exporting ..."
        assert str(context) in err[-1] and ("context" in err[-1] or "max_position_embeddings" in err[-1])


def _floats_in_header(d, field: str):
    """Rewrite the checkpoint's header with `field` (shape or data_offsets) as integral floats (4 -> 4.0)."""
    p = d / "model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        if k != "__metadata__":
            v[field] = [float(x) for x in v[field]]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


@pytest.mark.parametrize("field", ["data_offsets", "shape"])
def test_one_reader_every_command_judges_a_header_alike(tmp_path, capsys, field):
    """The safetensors format writes integers; a header with floats is refused by run, quantize and export
    with the same line (round two found export refusing what run and quantize took)."""
    d = _copy(tmp_path)
    _floats_in_header(d, field)
    lines = {_cli(capsys, *args).strip().splitlines()[-1] for args in (
        ("run", "--model", d, "--backend", "torch", "--prompt", "hi"),
        ("quantize", d, tmp_path / "q", "--recipe", "int8"),
        ("export", "--model", d, "--out", tmp_path / "o"))}
    assert len(lines) == 1 and f"{field}" in lines.pop() and not (tmp_path / "q").exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "processor_config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_a_side_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys, name, kind):
    """A FIFO (which would block a plain open forever), /dev/zero (st_size 0, endless), a folder: one line."""
    import os

    d = _copy(tmp_path)
    (d / name).unlink()
    if kind == "fifo":
        os.mkfifo(d / name)
    elif kind == "dev-zero":
        (d / name).symlink_to("/dev/zero")
    else:
        (d / name).mkdir()
    err = _cli(capsys, "run", "--model", d, "--backend", "torch", "--prompt", "hi", one_line=True)
    assert name in err


def test_a_huge_manifest_is_refused_before_it_is_read(tmp_path, capsys):
    from vl2edge.artifact import MANIFEST_MAX

    d = tmp_path / "e"
    d.mkdir()
    with open(d / "manifest.json", "wb") as f:  # sparse: 2 GB of nothing after a valid start
        f.write(b'{"format": "vl2edge.onnx.v1", "pad": "')
        f.truncate(2 * 2**30)
    for args in (("verify", d), ("run", "--model", d, "--prompt", "hi")):
        err = _cli(capsys, *args, one_line=True)
        assert "manifest.json" in err and f"{MANIFEST_MAX:,}" in err


OCR_EDITS = {
    "architectures": lambda c: c.update(architectures=["DeepseekOCRForCausalLM"]),
    "encoder widths": lambda c: c["vision_config"].update(width={"clip-l-14-224": {"width": 1024},
                                                                 "sam_vit_b": {"width": 768}}),
    "encoder name": lambda c: c["vision_config"].update(model_name="deeplip_b_l"),
}


@pytest.mark.parametrize("edit", sorted(OCR_EDITS))
def test_a_sibling_checkpoint_is_refused_naming_what_it_is(tmp_path, capsys, edit):
    """DeepSeek-OCR shares the deepseek_vl_v2 model_type with a SAM + CLIP encoder: refused at load, by name."""
    d = _copy(tmp_path)
    c = json.loads((d / "config.json").read_text())
    OCR_EDITS[edit](c)
    (d / "config.json").write_text(json.dumps(c))
    for args in (("info", "--model", d), ("run", "--model", d, "--backend", "torch", "--prompt", "hi"),
                 ("export", "--model", d, "--out", tmp_path / "o")):
        err = _cli(capsys, *args, one_line=True)
        assert "DeepSeek-OCR" in err or "DeepseekOCR" in err
    assert not (tmp_path / "o").exists()


def test_a_token_id_past_the_embedding_table_is_refused_at_load(tmp_path, capsys):
    """Ids need not be dense: a vocabulary whose largest id is vocab_size (count still within it) is refused."""
    d = _copy(tmp_path)
    vocab = json.loads((d / "config.json").read_text())["language_config"]["vocab_size"]
    t = json.loads((d / "tokenizer.json").read_text())
    v = t["model"]["vocab"]
    v[max(v, key=v.get)] = vocab
    (d / "tokenizer.json").write_text(json.dumps(t))
    err = _cli(capsys, "run", "--model", d, "--backend", "torch", "--prompt", "hi there", one_line=True)
    assert f"has id {vocab}" in err and "vocab_size" in err
