"""`vl2edge batch --ray` (vl2edge/ray_batch.py) on a local Ray instance: the same records as the local job,
in the same order, through a killed actor, and with the same resume semantics."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from tests import golden
from vl2edge.batch import run_batch

MODEL = golden.model_dir("tiny")
LOAD = {"device": "cpu", "dtype": "float32", "backend": "torch"}
GEN = {"max_new_tokens": 10}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Pictures, a three-page PDF and a file that is not a picture."""
    from PIL import Image

    d = tmp_path_factory.mktemp("ray-inputs")
    for name in ("square_384.png", "multi_a_300x500.png", "multi_c_256x256.png"):
        (d / name).write_bytes((golden.REF / "images" / name).read_bytes())
    pages = [Image.open(golden.REF / "images" / n).convert("RGB") for n in ("square_384.png", "multi_b_640x480.png",
                                                                         "multi_a_300x500.png")]
    pages[0].save(d / "doc.pdf", save_all=True, append_images=pages[1:])
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return [str(d)]


@pytest.fixture(scope="module")
def local_records(inputs, tmp_path_factory):
    import vl2edge

    pipe = vl2edge.load(MODEL, **LOAD)
    pipe.start_batching(2)
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    run_batch(pipe, inputs, "Describe.", out, progress=False, **GEN)
    pipe.start_batching(1)
    return _records(out)


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "timings"} for line in path.read_text().splitlines()]


def _job(**kw):
    from vl2edge.ray_batch import RayJob

    return RayJob(str(MODEL), LOAD, "Describe.", GEN, **{"actors": 2, "cpus": 1, "max_batch": 2, **kw})


def test_ray_job_equals_the_local_job(local_ray, inputs, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    counts = run_batch(None, inputs, "Describe.", out, progress=False, answer=_job(), **GEN)
    assert _records(out) == local_records
    assert counts == {"done": 6, "failed": 1, "skipped": 0}  # 3 pictures, 3 pages; a broken file
    assert any(r["page"] == 3 for r in local_records) and any("error" in r for r in local_records)


def test_ray_job_resumes_where_it_stopped(local_ray, inputs, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    lines = [json.dumps(r) for r in local_records[:3]]
    out.write_text("\n".join(lines) + "\n" + lines[2][:20])  # three done, then a torn line
    counts = run_batch(None, inputs, "Describe.", out, resume=True, progress=False, answer=_job(), **GEN)
    assert counts["skipped"] == 3 and counts["done"] + counts["failed"] == len(local_records) - 3
    assert _records(out) == local_records


def test_ray_job_refuses_resources_the_cluster_lacks(local_ray, inputs, tmp_path):
    """An actor asking for a GPU on a CPU-only cluster would wait for ever: refused in one line instead."""
    from vl2edge.errors import InputError

    with pytest.raises(InputError, match="asks for 1 GPUs .* cluster has 0"):
        run_batch(None, inputs, "Describe.", tmp_path / "o.jsonl", progress=False, answer=_job(gpus=1), **GEN)
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def _actor_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"MapBatches(Answerer)" in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_ray_job_survives_a_killed_actor(local_ray, inputs, local_records, tmp_path):
    """SIGKILL one actor while the job runs: Ray restarts it and reruns its rows; every record once, as local."""
    killed: list[int] = []

    def kill_one():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _actor_pids()
            if len(pids) >= 2:
                time.sleep(1.5)  # models loaded, rows in flight
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:  # that actor left meanwhile (Ray scaled the pool down): look again
                    continue
                killed.append(pids[0])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    out = tmp_path / "ray.jsonl"
    run_batch(None, inputs, "Describe.", out, progress=False, answer=_job(), **GEN)
    killer.join()
    assert killed, "no actor was found to kill"
    assert _records(out) == local_records


def test_cli_ray_refuses_an_unreachable_cluster(tmp_path):
    img = golden.REF / "images" / "square_384.png"
    r = subprocess.run([sys.executable, "-m", "vl2edge", "batch", "--model", str(MODEL), str(img), "--prompt", "Hi",
                        "--out", str(tmp_path / "o.jsonl"), "--ray", "127.0.0.1:1"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "cannot reach the Ray cluster" in r.stderr
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_cli_batch_on_ray_with_a_json_schema(tmp_path):
    """The command line end to end on a Ray instance of its own: options reach the actors (a JSON schema
    among them), the lines are the local command's."""
    img = golden.REF / "images"
    common = [sys.executable, "-m", "vl2edge", "batch", "--model", str(MODEL), str(img / "square_384.png"),
              str(img / "multi_c_256x256.png"), "--prompt", "Describe.", "--max-new-tokens", "12", "--json-schema",
              "object", "--device", "cpu", "--dtype", "float32", "--backend", "torch"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    for name, extra in (("local", []), ("ray", ["--ray", "--actors", "1"])):
        r = subprocess.run(common + ["--out", str(tmp_path / f"{name}.jsonl"), *extra], capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    got, want = _records(tmp_path / "ray.jsonl"), _records(tmp_path / "local.jsonl")
    assert got == want and all(isinstance(r["json"], dict) or r["finish_reason"] == "length" for r in got)


@pytest.mark.parametrize("args,fragment", [
    (["--ray", "127.0.0.1:99999"], "a port 1-65535"), (["--ray", "host:"], "expected auto"),
    (["--ray", "auto", "--cpus-per-actor", "nan"], "finite"), (["--ray", "auto", "--cpus-per-actor", "0"], "finite"),
    (["--ray", "auto", "--gpus-per-actor", "inf"], "finite"),
    (["--ray", "auto", "--cpus-per-actor", "1e300"], "finite"),
])
def test_ray_options_are_judged_before_ray_is_touched(tmp_path, monkeypatch, capsys, args, fragment):
    """Addresses, ports and per-actor resources at and past their edges: one line, exit 2, and Ray is never
    started (ray.init would retry or wait for minutes)."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    err = golden.cli_error(capsys, "batch", "--model", MODEL, golden.REF / "images" / "square_384.png", "--prompt",
                           "Hi", "--out", tmp_path / "o.jsonl", *args, one_line=True)
    assert fragment in err
