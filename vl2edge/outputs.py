"""Writing an output directory without ever harming what is there: `with OutputDir(dst) as tmp: ...`.

The command writes into a fresh temporary directory beside `dst` (same filesystem), and only when it
has finished is that directory renamed into place: an interrupted, failed or disk-full run leaves
`dst` exactly as it was and removes its own temporary files (a run killed outright cannot; the next
run for the same destination removes temporaries whose process is gone). A destination that already holds files
is refused unless `overwrite` is given (then the old directory is replaced as a whole, after the new
one is complete); a destination that is a file, that is one of the sources, or lies inside one (or
holds one), is refused before anything is written. OS errors (no space, read-only filesystem, a file
size limit, a path through a file, a name too long) become one-line `InputError`s naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
from pathlib import Path
from types import TracebackType

from .errors import InputError

REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the filesystem is read-only",
           errno.EFBIG: "a file would exceed the file-size limit", errno.EACCES: "permission denied",
           errno.ENOTDIR: "a part of the path is a file", errno.ENAMETOOLONG: "a name in the path is too long",
           errno.EDQUOT: "the disk quota is exceeded",
           errno.ELOOP: "it is a symbolic link (vl2edge does not write through links)"}


def os_reason(e: OSError) -> str:
    return REASONS.get(e.errno or 0, e.strerror or str(e))


def ignore_file_size_signal() -> None:
    """Past RLIMIT_FSIZE the kernel sends SIGXFSZ, which kills the process without a word; ignored, the
    write fails with EFBIG instead and becomes a clear error. Only the main thread may set it."""
    with contextlib.suppress(ValueError, AttributeError, OSError):  # not the main thread, or no such signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def refuse_link(path: Path) -> None:
    """A path vl2edge writes must not be a symbolic link (the write would land in whatever it points to)
    nor anything but a regular file."""
    if path.is_symlink():
        raise InputError(f"{path} is a symbolic link; vl2edge does not write through links (name the target)")
    if path.exists() and not path.is_file():
        raise InputError(f"cannot write {path}: it exists and is not a regular file")


def write_file(path, data: bytes) -> None:
    """`path` written whole or not at all, never through a link: the bytes go to a new temporary file beside
    it (created O_EXCL | O_NOFOLLOW) that is renamed over `path`; an existing regular file is replaced.
    OS errors are one-line InputErrors naming the path."""
    path = Path(path)
    try:
        refuse_link(path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except OSError as e:
        raise InputError(f"cannot write {path}: {os_reason(e)}") from None


def open_lock(path: Path) -> int:
    """A lock file's descriptor: created if missing, never truncated, never through a link (O_NOFOLLOW)."""
    try:
        refuse_link(path)
        return os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o644)
    except OSError as e:
        raise InputError(f"cannot open the lock file {path}: {os_reason(e)}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


class OutputDir:
    """A destination directory written atomically; the context yields the temporary directory to fill."""

    def __init__(self, dst, overwrite: bool = False, sources: tuple = ()):
        self.dst = Path(dst)
        self.overwrite = overwrite
        try:
            target = self.dst.resolve()
            for src in sources:
                s = Path(src).resolve()
                if _inside(target, s) or _inside(s, target):
                    raise InputError(f"the output {self.dst} overlaps the input {src}: write somewhere else")
            if self.dst.exists() and not self.dst.is_dir():
                raise InputError(f"the output {self.dst} is a file, not a directory")
            up = next(p for p in self.dst.absolute().parents if p.exists())
            if not up.is_dir():
                raise InputError(f"cannot write {self.dst}: a part of the path ({up}) is a file")
            if self.dst.is_dir() and any(self.dst.iterdir()) and not overwrite:
                raise InputError(f"the output {self.dst} already holds files; pass --overwrite to replace it, "
                                 "or choose a new directory")
        except OSError as e:
            raise InputError(f"cannot write {self.dst}: {os_reason(e)}") from None
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        ignore_file_size_signal()
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned()
            self.tmp.mkdir()
        except OSError as e:
            raise InputError(f"cannot write {self.dst}: {os_reason(e)}") from None
        return self.tmp

    def _remove_abandoned(self) -> None:
        """Temporaries of this destination left by a run that was killed (its process is gone)."""
        for p in self.dst.parent.glob(f".{glob.escape(self.dst.name)}.partial-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise InputError(f"cannot write {self.dst}: {os_reason(exc)} (nothing was changed there)") from None
            return
        old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
        try:
            if self.dst.is_dir():
                self.dst.rename(old)
            self.tmp.rename(self.dst)
        except OSError as e:
            if old.is_dir() and not self.dst.exists():
                old.rename(self.dst)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputError(f"cannot write {self.dst}: {os_reason(e)} (nothing was changed there)") from None
        shutil.rmtree(old, ignore_errors=True)
