"""Model location: a local directory, or a Hugging Face id resolved through `huggingface_hub`.

`resolve("deepseek-ai/deepseek-vl2-tiny")` downloads (with the hub's progress bars) only the files
vl2edge reads, into the standard Hugging Face cache, and returns the snapshot directory. Offline
(`HF_HUB_OFFLINE=1` or no network) a cached snapshot is used; without one the error says how to get
the files.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

KNOWN = ("deepseek-ai/deepseek-vl2-tiny", "deepseek-ai/deepseek-vl2-small", "deepseek-ai/deepseek-vl2")
PATTERNS = ["*.json", "*.safetensors", "*.onnx", "*.onnx.data", "*.bin", "*.txt", "*.npy"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_id, revision: str | None = None) -> Path:
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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{s} is neither a local directory nor a model on the Hugging Face hub "
                              f"(known DeepSeek-VL2 ids: {', '.join(KNOWN)})") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"cannot fetch {s} from the Hugging Face hub and it is not in the local cache ({type(e).__name__}). "
            f"On a machine with network access run `hf download {s} --local-dir models/{s.split('/')[-1]}`, "
            f"copy that directory here and pass --model models/{s.split('/')[-1]}") from None
