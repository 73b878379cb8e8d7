"""The built wheel carries every command: installed into a fresh venv, away from the repo, it runs
`vl2edge export --help`, `vl2edge quantize` on the demo model and `vl2edge info`."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv holding only the built wheel; the dependencies come from this venv's site-packages
    through a .pth line (so nothing is downloaded), the repository is not on its path."""
    tmp = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp / "dist"), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp / "dist").glob("vl2edge-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return wheel, venv, tmp


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, env=env)


def test_wheel_ships_quant_and_export_inside_the_package(fresh_venv):
    wheel, _, _ = fresh_venv
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("vl2edge/quant/convert.py", "vl2edge/quant/format.py", "vl2edge/export/build.py",
              "vl2edge/models/loading.py", "vl2edge/cli.py", "vl2edge/ui.html", "vl2edge/kernels/moe.py",
              "vl2edge/structured.py"):
        assert f in names, f
    assert not any(n.split("/")[0] in ("quant", "export", "tests", "bench") for n in names)


def test_installed_commands_run_outside_the_repo(fresh_venv):
    _, venv, tmp = fresh_venv
    r = _run(venv, tmp, "python", "-c", "import vl2edge, vl2edge.quant, vl2edge.export; "
                                        "print(vl2edge.__file__); print(vl2edge.export.__file__)")
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(str(venv)) for line in r.stdout.split()), r.stdout  # the wheel, not the repo

    r = _run(venv, tmp, "vl2edge", "export", "--help")
    assert r.returncode == 0 and "--recipe" in r.stdout and "--accuracy-level" in r.stdout, r.stderr

    r = _run(venv, tmp, "python", "-m", "vl2edge.synthetic", "--preset", "test-mha", "--out", str(tmp / "demo"))
    assert r.returncode == 0, r.stderr
    r = _run(venv, tmp, "vl2edge", "quantize", str(tmp / "demo"), str(tmp / "q"), "--recipe", "int4-experts")
    assert r.returncode == 0, r.stderr
    specs = json.loads((tmp / "q" / "quantization.json").read_text())["tensors"]
    assert specs["language.model.layers.1.mlp.experts.0.gate_proj.weight"]["bits"] == 4
    assert specs["language.lm_head.weight"]["bits"] == 8

    r = _run(venv, tmp, "vl2edge", "info", "--model", str(tmp / "q"))
    assert r.returncode == 0, r.stderr
    assert "| int4-experts |" in r.stdout and "MHA attention" in r.stdout
