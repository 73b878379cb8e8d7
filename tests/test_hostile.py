"""A corpus of bad inputs across the CLI, the Python API and the server: each gets a clear error and an
exit code / exception / HTTP status — never a traceback — and the server keeps serving afterwards."""

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import vl2edge
from tests import golden
from vl2edge.errors import VL2Error
from vl2edge.server import Limits, create_app

TINY = golden.model_dir("tiny")
IMG = str(golden.REF / "images" / "square_384.png")


def _png_bomb(w=60000, h=60000) -> bytes:
    """A tiny PNG that declares a huge image (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


# -- broken model directories -------------------------------------------------------------------------------

def _break(kind, d):
    cfg, st = d / "config.json", d / "model.safetensors"
    c = json.loads(cfg.read_text())
    if kind == "empty-dir":
        for f in d.iterdir():
            f.unlink()
    elif kind == "config-not-json":
        cfg.write_text("{ nope")
    elif kind == "config-wrong-model-type":
        cfg.write_text(json.dumps(c | {"model_type": "llava"}))
    elif kind == "config-bad-topk-method":
        c["language_config"]["topk_method"] = "random"
        cfg.write_text(json.dumps(c))
    elif kind == "config-missing-language":
        del c["language_config"]
        cfg.write_text(json.dumps(c))
    elif kind == "config-wrong-type":
        c["language_config"]["hidden_size"] = "64"
        cfg.write_text(json.dumps(c))
    elif kind == "no-tokenizer":
        (d / "tokenizer.json").unlink()
    elif kind == "tokenizer-garbage":
        (d / "tokenizer.json").write_text("garbage")
    elif kind == "no-processor-config":
        (d / "processor_config.json").unlink()
    elif kind == "processor-config-malformed":
        (d / "processor_config.json").write_text(json.dumps({"patch_size": 14}))
    elif kind == "weights-truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 3])
    elif kind == "weights-corrupt-header":
        b = bytearray(st.read_bytes())
        b[8:20] = b"\x00" * 12
        st.write_bytes(bytes(b))
    elif kind == "weights-zero-bytes":
        st.write_bytes(b"")
    elif kind == "weights-wrong-shape" or kind == "weights-missing-tensor" or kind == "weights-extra-tensor":
        from safetensors.numpy import load_file, save_file

        sd = load_file(st)
        if kind == "weights-wrong-shape":
            sd["image_newline"] = sd["image_newline"][:10]
        elif kind == "weights-missing-tensor":
            del sd["language.model.norm.weight"]
        else:
            sd["language.model.extra.weight"] = sd["image_newline"]
        save_file(sd, st)
    elif kind == "index-missing-shard":
        st.rename(d / "model-00001-of-000002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"image_newline": "model-00002-of-000002.safetensors"}}))
    elif kind == "no-weights":
        st.unlink()
    return d


MODEL_BREAKS = ["empty-dir", "config-not-json", "config-wrong-model-type", "config-bad-topk-method",
                "config-missing-language", "config-wrong-type", "no-tokenizer", "tokenizer-garbage",
                "no-processor-config", "processor-config-malformed", "weights-truncated", "weights-corrupt-header",
                "weights-zero-bytes", "weights-wrong-shape", "weights-missing-tensor", "weights-extra-tensor",
                "index-missing-shard", "no-weights"]


_cli = golden.cli_error


@pytest.mark.parametrize("kind", MODEL_BREAKS)
def test_cli_broken_model_directories(tmp_path, capsys, kind):
    d = _break(kind, shutil.copytree(TINY, tmp_path / "m"))
    _cli(capsys, "run", "--model", str(d), "--image", IMG, "--prompt", "hi", "--max-new-tokens", "2")


# -- bad command lines and inputs ---------------------------------------------------------------------------

def _files(tmp_path):
    (tmp_path / "text.png").write_text("I am not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.open(IMG).save(good, "PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:300])
    (tmp_path / "bomb.png").write_bytes(_png_bomb())
    (tmp_path / "dir.png").mkdir()
    return tmp_path


CLI_CASES = [
    (["run", "--model", "/no/such/model", "--prompt", "hi"], "no such model directory"),
    (["run", "--model", IMG, "--prompt", "hi"], "is a file"),
    (["run", "--model", str(TINY), "--image", "{t}/missing.png", "--prompt", "hi"], "image not found"),
    (["run", "--model", str(TINY), "--image", "{t}/dir.png", "--prompt", "hi"], "directory"),
    (["run", "--model", str(TINY), "--image", "{t}/text.png", "--prompt", "hi"], "cannot read"),
    (["run", "--model", str(TINY), "--image", "{t}/empty.png", "--prompt", "hi"], "cannot read"),
    (["run", "--model", str(TINY), "--image", "{t}/cut.png", "--prompt", "hi"], "cannot read"),
    (["run", "--model", str(TINY), "--image", "{t}/bomb.png", "--prompt", "hi"], "too large"),
    (["run", "--model", str(TINY), "--image", IMG, "--prompt", "<image><image> two"], "placeholder"),
    (["run", "--model", str(TINY), "--prompt", "word " * 5000], "context is 4096"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--repetition-penalty", "0"], "repetition_penalty"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--seed", "4.5"], "seed"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--dtype", "float8"], "invalid choice"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--max-new-tokens", "many"], "invalid int"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--gpu-memory", "lots"], "memory size"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--device", "cpu", "--gpu-memory", "1MiB"],
     "cannot hold this model's non-expert part"),
    (["run", "--model", str(TINY), "--prompt", "hi", "--draw", "{t}/out.png", "--max-new-tokens", "2"],
     "needs an image"),
    (["run", "--model", str(TINY), "--image", IMG, "--prompt", "hi", "--draw", "/no/such/dir/out.png",
      "--max-new-tokens", "2"], "cannot write"),
    (["run", "--model", "deepseek-ai/no-such-model", "--prompt", "hi"], "hub cannot be reached"),
    (["run", "--prompt", "hi"], "required"),
    (["batch", "--model", str(TINY), "{t}/missing.png", "--prompt", "x", "--out", "{t}/o.jsonl"], "no such file"),
    (["batch", "--model", str(TINY), IMG, "--out", "{t}/o.jsonl"], "exactly one of --prompt"),
    (["batch", "--model", str(TINY), IMG, "--prompt-file", "{t}/none.txt", "--out", "{t}/o.jsonl"], "cannot read"),
    (["info", "--model", "/no/such/model"], "not a model directory"),
    (["info", "--model", "deepseek-vl2-tiny", "--gpu-memory", "6 parsecs"], "memory size"),
]


@pytest.mark.parametrize("args,message", CLI_CASES, ids=[str(i) for i in range(len(CLI_CASES))])
def test_cli_bad_inputs(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _files(tmp_path)
    err = _cli(capsys, *[a.replace("{t}", str(tmp_path)) for a in args])
    assert message in err


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "https://no-such-host.invalid"])
def test_a_hub_id_without_network_fails_at_once_naming_what_to_do(tmp_path, endpoint):
    """No network (the hub's host refuses or does not resolve), no cached copy: one line within seconds that
    says how to pass a local directory and lists the known ids, not ~25 s of retries and warnings."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    schema = tmp_path / "s.json"
    schema.write_text("{not json")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vl2edge", "run", "--model", "deepseek-ai/deepseek-vl2-tinyy",
                        "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=120)
    assert time.perf_counter() - t0 < 15 and r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model" in lines[0] and "deepseek-ai/deepseek-vl2-small" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "vl2edge", "run", "--model", "deepseek-ai/deepseek-vl2-tinyy",
                        "--prompt", "hi", "--json-schema", str(schema)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--json-schema" in r.stderr  # the schema file is judged before the model


def test_batch_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "o.jsonl").write_text("{}\n")
    assert "exists" in _cli(capsys, "batch", "--model", str(TINY), IMG, "--prompt", "x", "--out",
                            str(tmp_path / "o.jsonl"))


# -- the Python API -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(TINY, device="cpu", dtype="float32")


API_CASES = [
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": [{"content": "hi"}]}, "'role' and 'content'"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": 42}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "first message"),
    ({"messages": [{"role": "assistant", "content": "<image>"}, {"role": "user", "content": "<image>"}],
      "images": [IMG]}, "assistant message"),
    ({"messages": [{"role": "user", "content": "<image>"}], "images": [42]}, "PIL image, a file path or bytes"),
    ({"messages": [{"role": "user", "content": "<image>"}], "images": [b"\x00garbage"]}, "cannot read"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": True}, "max_new_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "x"}, "seed"),
]


@pytest.mark.parametrize("case,message", API_CASES, ids=[str(i) for i in range(len(API_CASES))])
def test_api_bad_inputs(pipe, case, message):
    kw = dict(case)
    messages, images = kw.pop("messages"), kw.pop("images", None)
    with pytest.raises(VL2Error, match=message):
        pipe.chat(messages, images, **({"max_new_tokens": 2} | kw))


def test_api_bad_model_paths(tmp_path):
    for path, message in ((tmp_path / "none", "no such model directory"), (IMG, "is a file")):
        with pytest.raises(VL2Error, match=message):
            vl2edge.load(path, device="cpu")


# -- the server ---------------------------------------------------------------------------------------------

def _data(raw: bytes, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _img(url):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "x"}]}


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    Image.open(IMG).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    app = create_app(pipe, name="tiny", allowed_root=root, limits=Limits(max_request_bytes=2**20, max_images=2,
                                                                        max_output_tokens=16))
    return TestClient(app), root, outside


def _msgs(*m):
    return {"messages": list(m), "max_tokens": 2}


SERVER_CASES = [
    ("not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({}, 400, "non-empty list"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": "hi"}, 400, "non-empty list"),
    (_msgs({"role": "robot", "content": "hi"}), 400, "role"),
    (_msgs({"role": "user", "content": 7}), 400, "string or a list"),
    (_msgs({"role": "user", "content": [{"type": "audio", "audio": "x"}]}), 400, "unsupported content part"),
    (_msgs({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}), 400, "url string"),
    (_msgs(_img(_data(b"this is text, not a png"))), 400, "cannot read"),
    (_msgs(_img("data:image/png;base64,@@@not-base64@@@")), 400, "base64"),
    (_msgs(_img("data:image/png,rawbytes")), 400, "data URL must be"),
    (_msgs(_img(_data(_png_bomb()))), 400, "too large"),
    (_msgs(_img("../../etc/passwd")), 403, "outside the allowed"),
    (_msgs(_img("{outside}/secret.png")), 403, "outside the allowed"),
    (_msgs(_img("{root}/link.png")), 403, "outside the allowed"),
    (_msgs(_img("{root}/missing.png")), 400, "image not found"),
    (_msgs(_img("https://example.com/cat.png")), 400, "remote images are disabled"),
    (_msgs(_img("{png}"), _img("{png}"), _img("{png}")), 400, "at most 2 images"),
    (_msgs({"role": "user", "content": "say <image>"}), 400, "may not contain <image>"),
    (_msgs({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}), 400,
     "only user messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": -0.1}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -2**63 - 1}, 400, "seed"),
    (_msgs({"role": "user", "content": "word " * 5000}), 400, "prompt is"),
    ("x" * (2**20 + 10), 413, "request body"),
]


@pytest.mark.parametrize("body,status,message", SERVER_CASES, ids=[str(i) for i in range(len(SERVER_CASES))])
def test_server_bad_requests(server, body, status, message):
    client, root, outside = server
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, "PNG")
    raw = body if isinstance(body, str) else json.dumps(body).replace("{root}", str(root)).replace(
        "{outside}", str(outside)).replace("{png}", _data(small.getvalue()))
    r = client.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and "Traceback" not in r.text
    # ... and the server keeps serving
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_the_corpus_is_large_enough():
    assert len(MODEL_BREAKS) + len(CLI_CASES) + 1 + len(API_CASES) + 2 + len(SERVER_CASES) >= 60
