import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from vl2edge import synthetic
from vl2edge.config import VL2Config
from vl2edge.presets import preset, tiny
from vl2edge.processor import Processor
from vl2edge.weights import Checkpoint, bf16_to_f32


@pytest.mark.parametrize("name", ["test-mha", "test-mla", "test-mla-noaux"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path, name, dtype):
    out = synthetic.write_model(name, tmp_path / name, dtype=dtype, seed=7)
    cfg = VL2Config.from_pretrained(out)
    assert cfg.tensor_shapes() == preset(name).tensor_shapes()
    ck = Checkpoint.open(out)
    ck.check_keys(cfg.tensor_shapes())
    ck.check_shapes(cfg.tensor_shapes())
    st = "BF16" if dtype == "bfloat16" else "F32"
    regenerated = {}
    for k, chunk in synthetic.random_chunks(cfg, st, seed=7):
        regenerated.setdefault(k, []).append(chunk)
    for k, chunks in regenerated.items():
        want = np.concatenate(chunks)
        got = ck.files[ck.where[k]].raw(k).reshape(-1)
        assert np.array_equal(got, want), k
    assert ck.dtype("image_newline") == st
    # a different seed gives different weights
    other = synthetic.write_model(name, tmp_path / "other", dtype=dtype, seed=8)
    assert not np.array_equal(Checkpoint.open(other).numpy("image_newline"), ck.numpy("image_newline"))


def test_the_written_directory_is_a_usable_model_dir(tmp_path):
    out = synthetic.write_model("test-mha", tmp_path / "m")
    proc = Processor.from_pretrained(out)
    assert (proc.bos_id, proc.eos_id, proc.image_token_id) == (0, 1, 3)
    res = proc([{"role": "user", "content": "<image>\n<|grounding|>Locate <|ref|>the red circle<|/ref|>."}],
               [synthetic.sample_image()])
    assert res.images_spatial_crop[0].tolist() == [[2, 2]]
    text = proc.decode(res.input_ids[0][~res.images_seq_mask[0]])
    assert "<|ref|>the red circle<|/ref|>" in text
    assert max(res.input_ids[0]) < VL2Config.from_pretrained(out).language_config.vocab_size


def test_large_checkpoints_are_sharded_like_the_official_repos(tmp_path):
    cfg = tiny("mha").replace(language_config={"vocab_size": 40000, "hidden_size": 512, "intermediate_size": 64,
                                               "moe_intermediate_size": 8},
                              projector_config={"n_embed": 512})
    synthetic.write_model(cfg, tmp_path, dtype="bfloat16", max_shard_bytes=50 * 2**20)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert [s.name for s in shards] == ["model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors"]
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert Checkpoint.open(tmp_path).numpy("language.lm_head.weight").shape == (40000, 512)


def test_writing_streams_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 1 << 20)
    cfg = tiny("mha").replace(language_config={"vocab_size": 65536, "hidden_size": 256},
                              projector_config={"n_embed": 256})
    full_tensor = 65536 * 256 * 4  # one float32 embedding table: 64 MiB
    tracemalloc.start()
    synthetic.write_model(cfg, tmp_path, dtype="bfloat16")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < full_tensor / 3, f"peak {peak / 2**20:.1f} MiB"


def test_cli_writes_a_model_and_the_sample_image(tmp_path):
    subprocess.run([sys.executable, "-m", "vl2edge.synthetic", "--preset", "test-mla", "--out", str(tmp_path / "m"),
                    "--sample-image", str(tmp_path / "demo.png")], check=True, capture_output=True)
    assert VL2Config.from_pretrained(tmp_path / "m").language_config.use_mla
    assert Image.open(tmp_path / "demo.png").size == (640, 480)


def test_bf16_weights_are_the_rounded_float32_weights(tmp_path):
    a = Checkpoint.open(synthetic.write_model("test-mha", tmp_path / "a", dtype="float32"))
    b = Checkpoint.open(synthetic.write_model("test-mha", tmp_path / "b", dtype="bfloat16"))
    x, y = a.numpy("language.lm_head.weight"), b.numpy("language.lm_head.weight")
    assert np.abs(x - y).max() <= np.abs(x).max() / 128 and np.array_equal(bf16_to_f32(b.files[b.where[
        "language.lm_head.weight"]].raw("language.lm_head.weight")), y)


@pytest.mark.parametrize("name,dtype", [("test-mla", "bfloat16"), ("test-mha", "float32")])
def test_a_generated_checkpoint_reads_as_the_written_one(tmp_path, name, dtype):
    written = Checkpoint.open(synthetic.write_model(name, tmp_path / "w", dtype=dtype, seed=3))
    gen_dir = synthetic.write_model(name, tmp_path / "g", dtype=dtype, seed=3, generated=True)
    assert not list(gen_dir.glob("*.safetensors"))
    generated = Checkpoint.open(gen_dir)
    assert generated.keys() == written.keys() and generated.nbytes() == written.nbytes()
    for k in written.where:
        assert (generated.dtype(k), generated.shape(k)) == (written.dtype(k), written.shape(k))
        assert np.array_equal(generated.numpy(k), written.numpy(k)), k
        assert np.array_equal(generated.numpy(k, rows=slice(1, 3)), written.numpy(k, rows=slice(1, 3))), k
    assert np.array_equal(generated.torch("image_newline").float().numpy(), written.numpy("image_newline"))


def test_a_generated_checkpoint_keeps_one_tensor_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 1 << 16)
    cfg = tiny("mha").replace(language_config={"vocab_size": 65536, "hidden_size": 256},
                              projector_config={"n_embed": 256})
    ck = Checkpoint.open(synthetic.write_model(cfg, tmp_path, dtype="bfloat16", generated=True))
    table = 65536 * 256 * 2  # the bf16 embedding table, 32 MiB
    tracemalloc.start()
    for k in ck.where:
        ck.numpy(k, rows=slice(0, 1))
        ck.release(k)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5 * table, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("marker", [
    '{"generator": "other", "seed": 0, "dtype": "BF16"}',
    '{"generator": "vl2edge.synthetic", "seed": -1, "dtype": "BF16"}',
    '{"generator": "vl2edge.synthetic", "seed": 0, "dtype": "I8"}',
    '{"generator": "vl2edge.synthetic", "seed": 0',
    '[]',
])
def test_a_bad_generated_marker_is_one_line_and_exit_2(tmp_path, marker):
    gen_dir = synthetic.write_model("test-mha", tmp_path / "g", generated=True)
    (gen_dir / synthetic.GENERATED_NAME).write_text(marker)
    r = subprocess.run([sys.executable, "-m", "vl2edge", "export", "--model", str(gen_dir), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1 and synthetic.GENERATED_NAME in errors[0], r.stderr
    assert not (tmp_path / "out").exists()
