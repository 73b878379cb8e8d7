import json
import shutil

import numpy as np
import pytest
import torch

from tests import golden
from vl2edge.config import VL2Config
from vl2edge.errors import CheckpointError
from vl2edge.weights import (
    INDEX_NAME,
    Checkpoint,
    SafetensorsWriter,
    bf16_to_f32,
    f32_to_bf16,
    write_checkpoint,
)


@pytest.fixture
def tiny_copy(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(golden.model_dir("tiny"), dst)
    return dst


def test_reads_the_official_layout_like_safetensors():
    from safetensors.numpy import load_file

    ck = Checkpoint.open(golden.model_dir("base"))
    ref = load_file(golden.model_dir("base") / "model.safetensors")
    assert set(ck.keys()) == set(ref)
    for k in ("vision.pos_embed", "language.model.layers.1.mlp.gate.e_score_correction_bias", "view_seperator"):
        assert np.array_equal(ck.numpy(k), ref[k])
        assert torch.equal(ck.torch(k), torch.from_numpy(ref[k]))
    assert ck.numpy("image_newline", dtype=np.float16).dtype == np.float16
    assert ck.torch("image_newline", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_strict_key_check_names_missing_and_unexpected():
    ck = Checkpoint.open(golden.model_dir("tiny"))
    shapes = VL2Config.from_pretrained(golden.model_dir("tiny")).tensor_shapes()
    ck.check_keys(shapes)
    wanted = set(shapes) - {"language.lm_head.weight"} | {"language.model.layers.9.mlp.gate.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. language.model.layers.9.mlp.gate.weight\)"
                                              r".*1 unexpected \(e.g. language.lm_head.weight\)"):
        ck.check_keys(wanted)
    with pytest.raises(CheckpointError, match="image_newline: file \\[64\\] vs config \\[65\\]"):
        ck.check_shapes({"image_newline": (65,)})


def test_truncated_file_is_reported(tiny_copy):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(tiny_copy)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(tiny_copy)


def test_corrupt_header_is_reported(tiny_copy):
    f = tiny_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint.open(tiny_copy)
    f.write_bytes(b"\xff" * 8 + bytes(data[8:]))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint.open(tiny_copy)


def test_missing_weights_and_shards(tmp_path, tiny_copy):
    with pytest.raises(CheckpointError, match="no such model directory"):
        Checkpoint.open(tmp_path / "nope")
    (tiny_copy / "model.safetensors").rename(tiny_copy / "model-00001-of-000001.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint.open(tiny_copy)
    (tiny_copy / INDEX_NAME).write_text(json.dumps({"weight_map": {"image_newline": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing: model-00002.safetensors"):
        Checkpoint.open(tiny_copy)
    (tiny_copy / INDEX_NAME).write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint.open(tiny_copy)


def test_sharded_write_and_read_round_trip(tmp_path):
    src = Checkpoint.open(golden.model_dir("small"))
    specs = {k: ("F32", src.shape(k)) for k in src.where}
    files = write_checkpoint(tmp_path, specs, ((k, src.numpy(k)) for k in src.where), max_shard_bytes=300_000)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) > 3 and shards[0].name == f"model-00001-of-{len(shards):06d}.safetensors"
    back = Checkpoint.open(tmp_path)
    assert set(back.keys()) == set(src.keys())
    for k in src.where:
        assert np.array_equal(back.numpy(k), src.numpy(k))


def test_writer_checks_order_and_completeness(tmp_path):
    specs = {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}
    with pytest.raises(CheckpointError, match="header order"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("b", np.zeros(4, np.uint16))
    with pytest.raises(CheckpointError, match="wrote 12 of 32"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", np.zeros(3, np.float32))
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"}) as w:
        w.write("a", np.arange(3, dtype=np.float32))  # row chunks
        w.write("a", np.arange(3, 6, dtype=np.float32))
        w.write("b", f32_to_bf16(np.array([1.5, -2, 3.25, 1e-3], np.float32)))
    ck = Checkpoint.open(tmp_path / "x.safetensors")
    assert ck.metadata == {"k": "v"}
    assert ck.numpy("a").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ck.torch("b").dtype == torch.bfloat16


def test_bf16_conversion_matches_torch():
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 100
    ours = f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(bf16_to_f32(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_released_pages_read_back_identically(tmp_path):
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    write_checkpoint(tmp_path, {"w": ("F32", x.shape)}, [("w", x)])
    ck = Checkpoint.open(tmp_path)
    half = ck.numpy("w", dtype=np.float16)          # a converted copy: the mapped pages are dropped
    assert np.array_equal(half, x.astype(np.float16))
    assert np.array_equal(ck.numpy("w"), x)          # ... and re-read from the file on the next access
    dst = torch.empty(1024, 1024, dtype=torch.bfloat16)
    ck.copy_into("w", dst)
    assert torch.equal(dst, torch.from_numpy(x).to(torch.bfloat16)) and np.array_equal(ck.numpy("w"), x)
