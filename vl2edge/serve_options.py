"""`vl2edge serve`'s start-up options, judged before the model loads: values that would leave a server
unusable (a key with spaces at its ends, an allowed root that is not a folder, a CORS origin with a path, a
port already taken) are refused in one line, so nobody waits minutes for a model to load into a server
that cannot serve."""

from __future__ import annotations

import errno
import socket
import urllib.parse
from pathlib import Path

from .errors import InputError


def api_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip():
        raise InputError("the API key is empty (--api-key \"\" or an empty VL2EDGE_API_KEY, an unset variable?): "
                         "refusing an empty API key, which would leave the server open to anyone; give a key, or "
                         "leave both out to serve without one")
    if key != key.strip():
        raise InputError("the API key has spaces at its ends (a copy-paste?): clients cannot send them in "
                         "'Authorization: Bearer KEY'; pass the key without them")
    if not key.isprintable():
        raise InputError("the API key holds control characters; an HTTP header cannot carry them")
    return key


def allowed_root(root: str | None) -> Path | None:
    if root is None:
        return None
    try:
        p = Path(root).expanduser().resolve()
        ok = p.is_dir()
    except (OSError, RuntimeError, ValueError) as e:  # a name too long, a NUL byte, an unknown ~user
        raise InputError(f"--allowed-root {root!r:.120}: {getattr(e, 'strerror', None) or e}") from None
    if not ok:
        raise InputError(f"--allowed-root {root} is not a folder (no local image could ever be served)")
    return p


def cors_origins(origins: list[str]) -> tuple[str, ...]:
    """'*' or scheme://host[:port] (a browser's Origin has no path); a trailing '/' is dropped."""
    out = []
    for o in origins:
        if o == "*":
            out.append(o)
            continue
        u = urllib.parse.urlsplit(o.rstrip("/"))
        try:
            port_ok = u.port is None or 0 < u.port < 65536
        except ValueError:
            port_ok = False
        if u.scheme not in ("http", "https") or not u.hostname or u.path or u.query or u.fragment or not port_ok \
                or u.username or u.password:
            raise InputError(f"--cors-origin {o!r} is not an origin: give scheme://host[:port] (no path), e.g. "
                             "http://localhost:3000, or '*'")
        out.append(f"{u.scheme}://{u.netloc}".lower())
    return tuple(dict.fromkeys(out))


def port_free(host: str, port: int) -> None:
    """The address can be bound (checked before the model loads; uvicorn binds it again to serve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise InputError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror or e}"
            raise InputError(f"port {port} on {host} {why}; choose another with --port") from None
