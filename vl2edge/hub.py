"""Model location: a local directory, or a Hugging Face id resolved through `huggingface_hub`.

`resolve("deepseek-ai/deepseek-vl2-tiny")` downloads (with the hub's progress bars) only the files
vl2edge reads, into the standard Hugging Face cache, and returns the snapshot directory. Offline
(`HF_HUB_OFFLINE=1`, or the hub's host not answering within PROBE_TIMEOUT_S) a cached snapshot is used;
without one the error says at once how to get the files (no retries).
"""

from __future__ import annotations

import re
import socket
import urllib.parse
from pathlib import Path

from .errors import CheckpointError

KNOWN = ("deepseek-ai/deepseek-vl2-tiny", "deepseek-ai/deepseek-vl2-small", "deepseek-ai/deepseek-vl2")
PATTERNS = ["*.json", "*.safetensors", "*.onnx", "*.onnx.data", "*.bin", "*.txt", "*.npy"]
PROBE_TIMEOUT_S = 3.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _repo_id(path_or_id) -> str | Path:
    """A local model directory as a Path, else the Hugging Face id it must be (CheckpointError if neither)."""
    s = str(path_or_id)
    try:
        p = Path(path_or_id).expanduser()
        if p.is_dir():
            return p
        exists = p.exists()
    except (OSError, RuntimeError, ValueError) as e:  # a name too long, a NUL byte, an unknown ~user
        raise CheckpointError(f"cannot use {s[:120]!r} as a model: {getattr(e, 'strerror', None) or e}") from None
    if exists:
        raise CheckpointError(f"{s} is a file; --model wants a model directory or a Hugging Face id")
    if not _REPO_ID.match(s) or s.startswith((".", "/", "~")):
        raise CheckpointError(f"no such model directory: {s} (a Hugging Face id looks like {KNOWN[0]})")
    return s


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host answers a TCP connection: without network the hub client retries each
    request for ~25 s with a warning per try, so a mistyped id or an offline machine is told at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def _fetch(repo: str, revision: str | None, **kw) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    def get(**offline):
        if "filename" in kw:
            return Path(hf_hub_download(repo, revision=revision, **kw, **offline)).parent
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS, **offline))

    try:
        if not hub_reachable():
            try:
                return get(local_files_only=True)  # a cached snapshot serves offline
            except (LocalEntryNotFoundError, OSError, ValueError):
                name = repo.split("/")[-1]
                raise CheckpointError(
                    f"{repo} is not a local directory, not in the Hugging Face cache, and the hub cannot be reached "
                    f"(no network?): pass a model directory (--model models/{name}, made on a machine with "
                    f"network by `hf download {repo} --local-dir models/{name}`); DeepSeek-VL2 ids: "
                    f"{', '.join(KNOWN)}") from None
        return get()
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo} is neither a local directory nor a model on the Hugging Face hub "
                              f"(known DeepSeek-VL2 ids: {', '.join(KNOWN)})") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        name = repo.split("/")[-1]
        raise CheckpointError(
            f"cannot fetch {repo} from the Hugging Face hub and it is not in the local cache ({type(e).__name__}). "
            f"On a machine with network access run `hf download {repo} --local-dir models/{name}`, "
            f"copy that directory here and pass --model models/{name}") from None


def resolve(path_or_id, revision: str | None = None) -> Path:
    found = _repo_id(path_or_id)
    return found if isinstance(found, Path) else _fetch(found, revision)


def config_dir(path_or_id, revision: str | None = None) -> Path:
    """A directory holding the model's config.json, fetching that one file alone for a hub id: what the
    fits check (vl2edge/fits.py) reads before the weights are downloaded."""
    found = _repo_id(path_or_id)
    return found if isinstance(found, Path) else _fetch(found, revision, filename="config.json")
