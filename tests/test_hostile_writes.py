"""Writes that cannot touch a user's file (issue 31, round three): every path the project writes is created
without following links and every output folder follows `vl2edge export`'s rules (a folder that holds files
is refused without --overwrite). For each command that writes, a symbolic link is planted where it writes,
pointing at a file of the user's: the command fails with one line and exit 2, and the user's file keeps its
bytes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import golden
from vl2edge.errors import InputError
from vl2edge.outputs import open_lock, write_file

TINY = str(golden.model_dir("tiny"))
USER_BYTES = b"the user's own file\n"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.replace("\r", "\n").splitlines() if "error" in x.lower()]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


@pytest.fixture
def victim(tmp_path) -> Path:
    v = tmp_path / "user" / "precious.txt"
    v.parent.mkdir()
    v.write_bytes(USER_BYTES)
    return v


def _plant(link: Path, victim: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return link


def _picture(tmp_path) -> str:
    from PIL import Image

    p = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(p)
    return str(p)


# each: (name, how to build the command given (tmp_path, link)) ; the link is planted at the path it writes
COMMANDS = {
    "run --draw": lambda tmp, link: ("vl2edge", "run", "--model", TINY, "--backend", "torch", "--image",
                                     _picture(tmp), "--prompt", "hi", "--max-new-tokens", "2", "--draw", str(link)),
    "batch --out": lambda tmp, link: ("vl2edge", "batch", "--model", TINY, "--backend", "torch", "--prompt", "hi",
                                      "--max-new-tokens", "2", "--out", str(link), "--resume", _picture(tmp)),
    "synthetic --sample-image": lambda tmp, link: ("vl2edge.synthetic", "--preset", "test-mha", "--out",
                                                   str(tmp / "m"), "--sample-image", str(link)),
    "demo_run --out": lambda tmp, link: ("vl2edge.demo_run", "--model", TINY, "--out", str(link.parent), "--seed", "1"),
    "demo_eval --json": lambda tmp, link: ("vl2edge.demo_eval", "--model", TINY, "--paths", "torch-fp32",
                                           "--per-task", "1", "--json", str(link)),
}
LINK_NAME = {"demo_run --out": "pics/number.png", "run --draw": "boxes.png"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_writes_through_a_link(tmp_path, victim, command):
    link = _plant(tmp_path / LINK_NAME.get(command, "out.file"), victim)
    line = _one_error_line(_cli(*COMMANDS[command](tmp_path, link)))
    assert "link" in line
    assert victim.read_bytes() == USER_BYTES and link.is_symlink()


def test_the_export_cache_lock_is_never_opened_through_a_link(tmp_path, victim, monkeypatch):
    from vl2edge.export_cache import cached_export, entry_for

    monkeypatch.setenv("VL2EDGE_CACHE", str(tmp_path / "cache"))
    entry = entry_for(Path(TINY))
    _plant(entry.parent / f".{entry.name}.lock", victim)
    with pytest.raises(InputError, match="symbolic link"):
        cached_export(Path(TINY), progress=False)
    assert victim.read_bytes() == USER_BYTES and not entry.exists()


def test_write_file_replaces_a_regular_file_whole_and_refuses_links_and_folders(tmp_path, victim):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    write_file(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir() if p.name != "user"] == ["a.json"]
    for bad in (_plant(tmp_path / "l.json", victim), tmp_path / "user"):
        with pytest.raises(InputError):
            write_file(bad, b"x")
    assert victim.read_bytes() == USER_BYTES
    lock = open_lock(tmp_path / "x.lock")
    os.close(lock)
    assert (tmp_path / "x.lock").read_bytes() == b""


@pytest.mark.parametrize("module,args", [
    ("vl2edge.train_demo", ["--steps", "1", "--batch", "1", "--eval", "0"]),
    ("vl2edge.synthetic", ["--preset", "test-mha"]),
])
def test_a_folder_that_holds_files_is_refused_without_overwrite(tmp_path, module, args):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(USER_BYTES)
    line = _one_error_line(_cli(module, "--out", str(out), *args))
    assert "--overwrite" in line and (out / "notes.txt").read_bytes() == USER_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary left beside it


@pytest.mark.parametrize("arg,value", [("--steps", "0"), ("--batch", "-3"), ("--lr", "nan"), ("--patch", "7"),
                                       ("--eval", "-1"), ("--threads", "0")])
def test_train_demo_checks_its_arguments_before_training(tmp_path, arg, value):
    r = _cli("vl2edge.train_demo", "--out", str(tmp_path / "m"), arg, value)
    assert r.returncode == 2 and arg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args,fragment", [(["--per-task", "0"], "--per-task"), (["--per-task", "-5"], "--per-task"),
                                           (["--paths", ","], "--paths"), (["--paths", "torch-fp64"], "unknown")])
def test_demo_eval_checks_its_arguments_before_evaluating(args, fragment):
    r = _cli("vl2edge.demo_eval", "--model", TINY, *args)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr
