"""`vl2edge serve`'s start-up options are judged before the model loads (issue 31, round three): values
that would leave the server unusable are refused in one line, exit 2 — generated at and past their edges."""

import socket

import pytest

from tests import golden
from vl2edge import serve_options
from vl2edge.errors import InputError

TINY = golden.model_dir("tiny")


def _serve_error(capsys, *extra) -> str:
    return golden.cli_error(capsys, "serve", "--model", TINY, *extra, one_line=True)


@pytest.mark.parametrize("key", [" sekret", "sekret ", "\tsekret", "sek\x00ret", "sek\nret", " "])
def test_an_api_key_a_client_cannot_send_is_refused(capsys, key):
    assert "API key" in _serve_error(capsys, "--api-key", key)


@pytest.mark.parametrize("origin", ["http://localhost:3000/app", "localhost:3000", "ftp://x.org", "http://",
                                    "http://x.org?a=1", "http://x.org:99999", "http://u:p@x.org", "null"])
def test_a_cors_origin_that_is_not_an_origin_is_refused(capsys, origin):
    assert "--cors-origin" in _serve_error(capsys, "--cors-origin", origin)


def test_cors_origins_are_normalised():
    assert serve_options.cors_origins(["http://LocalHost:3000/", "http://localhost:3000", "*"]) == \
        ("http://localhost:3000", "*")


def test_an_allowed_root_that_is_not_a_folder_is_refused(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    for root in (tmp_path / "missing", tmp_path / "f", "\x00"):
        assert "--allowed-root" in _serve_error(capsys, "--allowed-root", root)


def test_a_port_in_use_and_a_queue_of_zero_are_refused_before_loading(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert f"port {port} on 127.0.0.1 is already in use" in _serve_error(capsys, "--port", port)
    assert "--max-queue" in golden.cli_error(capsys, "serve", "--model", TINY, "--max-queue", "0")
    with pytest.raises(InputError, match="--host"):
        serve_options.port_free("no-such-host.invalid", 8000)


def test_a_cache_that_is_a_file_is_named(capsys, tmp_path, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("x")
    monkeypatch.setenv("VL2EDGE_CACHE", str(f))
    monkeypatch.setenv("VL2EDGE_BACKEND", "auto")
    err = golden.cli_error(capsys, "run", "--model", TINY, "--prompt", "hi", one_line=True)
    assert "VL2EDGE_CACHE" in err and "is a file" in err
