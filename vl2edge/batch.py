"""Batch jobs: one prompt, or several (`--prompts`), over files, folders and PDFs, results as JSON lines.

Folders are walked (sorted, recursively, symlinked folders not followed) for images and PDFs; PDF
pages are rendered with pypdfium2. Each result line carries the source as typed, `source_path` (the
file's resolved absolute path), the page (PDFs), the answer, the grounding boxes and the timings. With
several prompts each page is read once and asked every prompt in order (one line per page and prompt, which
carries its `prompt`): the prefix cache (vl2edge/prefix_cache.py) gives the later prompts the page's
image positions, so only the first pays for the vision tower and the page's prefill.

Bad input, and what it gets:
- A file that cannot be read (any bad image, see `vl2edge.images`; a broken PDF or page) gets an
  `error` line and the job goes on; an error line counts as done, so `--resume` does not retry it.
- PDFs: at most `MAX_PDF_PAGES` pages each; at the first page that cannot be loaded (a page count
  that lies) one error line stands for the rest; a page whose size in points × `PDF_SCALE` exceeds
  `images.MAX_IMAGE_PIXELS` gets an error line before anything is rendered.
- The output: every line is written whole and fsync'd before the next item starts; a write that fails
  (full disk, file-size limit, read-only file system) is cut back to the last whole line and stops the
  job with an `InputError` naming the file and the reason. The writer ignores SIGXFSZ (from the main
  thread; `outputs.ignore_file_size_signal`), so a file-size limit raises EFBIG instead of killing us.
  An `--out` that is a folder, not a regular file, under a file or not writable is refused up front.
- Resume matches (source_path, page, prompt); old lines without `source_path` match their resolved
  `source`; lines without `prompt` are single-prompt jobs' lines.
  A last line that does not parse or lacks its newline is a torn write: it is cut off and its item
  redone. Any other line that is not a result line is an error naming its number; nothing is dropped.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .errors import InputError, VL2Error
from .images import SUFFIXES, check_size, display_name, load_image, open_file
from .outputs import NO_FOLLOW, ignore_file_size_signal, os_reason
from .schema import check_text

PDF_SCALE = 2.0        # render PDF pages at 144 dpi
MAX_PDF_PAGES = 5000   # pages read from one PDF; the rest get one error line
RECORD_PREFIX = b'{"source": '  # how every result line starts (a torn tail must too, to be cut)
PDF_MAGIC = b"%PDF-"
MAX_PROMPT_FILE_BYTES = 2**20  # a prompt is at most a context (a few thousand tokens) long

Key = tuple[str, int | None, str | None]  # (canonical source, page, prompt: None in a single-prompt job)
MAX_PROMPTS = 1000     # prompts in a --prompts file
Loader = Callable[[], object]


def canonical(path) -> str:
    """The resolved absolute path: the same file typed relatively or absolutely gives the same key."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.abspath(path)


def expand(inputs: list[str]) -> list[Path]:
    """Files in command-line order; folders replaced by the images and PDFs they hold (sorted)."""
    out: list[Path] = []
    for s in inputs:
        try:
            mode = os.stat(s).st_mode
        except FileNotFoundError:
            raise InputError(f"no such file or folder: {display_name(s)}") from None
        except (OSError, ValueError) as e:
            reason = os_reason(e) if isinstance(e, OSError) else str(e)
            raise InputError(f"cannot use input {display_name(s)}: {reason}") from None
        out += _walk(s) if stat.S_ISDIR(mode) else [Path(s)]
    return out


def _walk(folder: str) -> list[Path]:
    """Images and PDFs under `folder`; a subfolder that cannot be listed is kept, to get an error line."""
    found: list[Path] = []
    unlisted: list[Path] = []
    for root, _dirs, files in os.walk(folder, onerror=lambda e: unlisted.append(Path(e.filename))):
        found += [Path(root, f) for f in files if os.path.splitext(f)[1].lower() in SUFFIXES | {".pdf"}]
    return sorted(found + unlisted)


def _returning(value) -> Loader:
    return lambda: value


def _failing(error: InputError) -> Loader:
    def load():
        raise error
    return load


def items(path: Path, only: int | None = None) -> Iterator[tuple[int | None, Loader]]:
    """(page, load) pairs of one file: page None for an image, 1.. for PDF pages. `load()` returns what
    the pipeline takes (a path or a rendered page) or raises the InputError to report for that item.
    `only`: the PDF page to list, and no other (how a Ray actor finds its item again)."""
    if path.is_dir():  # a folder os.walk could not list
        try:
            os.listdir(path)
        except OSError as e:
            yield None, _failing(InputError(f"cannot list folder {display_name(path)}: {os_reason(e)}"))
        return
    if not _is_pdf(path):
        yield None, _returning(path)
        return
    yield from _pdf_pages(path, only)


def load_item(path: Path, page: int | None):
    """What the loader `items(path)` gives for `page` returns (or raises): an item found again by its page."""
    for p, load in items(path, only=page):
        if p == page:
            return load()
    raise InputError(f"{display_name(path)} has no page {page}")


def _is_pdf(path: Path) -> bool:
    """Starting like a PDF, whatever the name says (a PNG named .pdf is a picture); an unreadable file is
    judged by its name, and its reader reports why it cannot be opened."""
    try:
        with open_file(path, "file") as f:
            return f.read(len(PDF_MAGIC)) == PDF_MAGIC
    except (InputError, OSError):
        return path.suffix.lower() == ".pdf"


def _pdf_pages(path: Path, only: int | None) -> Iterator[tuple[int | None, Loader]]:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise InputError("PDF input needs pypdfium2: pip install 'vl2edge[pdf]'") from None
    name = display_name(path)
    try:
        f = open_file(path, "PDF")
    except InputError as e:
        yield None, _failing(e)
        return
    with f:
        try:
            pdf = pdfium.PdfDocument(f)
        except Exception as e:
            yield None, _failing(InputError(f"cannot read PDF {name}: {e}"))
            return
        try:
            yield from _pages(pdf, name, only)
        finally:
            pdf.close()


def _pages(pdf, name: str, only: int | None) -> Iterator[tuple[int | None, Loader]]:
    try:
        n = len(pdf)
    except Exception as e:
        yield None, _failing(InputError(f"cannot read the pages of PDF {name}: {e}"))
        return
    if n <= 0:
        yield None, _failing(InputError(f"PDF {name} has no pages"))
    for i in range(min(n, MAX_PDF_PAGES)):
        if only is not None and i + 1 != only:
            continue
        try:
            page = pdf[i]
        except Exception as e:  # e.g. a page tree whose /Count lies: stop, one line for the rest
            rest = f"pages {i + 1}-{n}" if n > i + 1 else f"page {i + 1}"
            yield i + 1, _failing(InputError(f"cannot load page {i + 1} of {name} ({e}); {rest} of the {n:,} "
                                             "the file declares are skipped"))
            return
        try:
            yield i + 1, functools.partial(_render, page, f"page {i + 1} of {name}")
        finally:
            page.close()
    if n > MAX_PDF_PAGES and only in (None, MAX_PDF_PAGES + 1):
        yield MAX_PDF_PAGES + 1, _failing(InputError(
            f"{name} has {n:,} pages; vl2edge reads at most {MAX_PDF_PAGES:,} pages of a PDF, so pages "
            f"{MAX_PDF_PAGES + 1:,}-{n:,} are skipped"))


def _render(page, what: str):
    """One PDF page as a PIL image; its size is checked against the pixel cap before rendering."""
    try:
        w, h = page.get_size()
    except Exception as e:
        raise InputError(f"cannot read the size of {what}: {e}") from None
    check_size(w * PDF_SCALE, h * PDF_SCALE, f"{what} ({w:g}x{h:g} points at {72 * PDF_SCALE:g} dpi)")
    try:
        return page.render(scale=PDF_SCALE).to_pil()
    except Exception as e:
        raise InputError(f"cannot render {what}: {e}") from None


def _record_key(r) -> Key | None:
    """(canonical source, page) of a parsed result line, or None when it is not one."""
    if not isinstance(r, dict) or not isinstance(r.get("source"), str):
        return None
    page, source_path, prompt = r.get("page"), r.get("source_path"), r.get("prompt")
    if not (page is None or (isinstance(page, int) and not isinstance(page, bool))):
        return None
    if not (prompt is None or isinstance(prompt, str)):
        return None
    return (source_path if isinstance(source_path, str) else canonical(r["source"])), page, prompt


def read_done(out: Path) -> tuple[set[Key], int]:
    """The keys the results file holds and the length of its whole lines (a torn last line excluded).
    Raises InputError, naming the line, for a line that is not a result line anywhere else."""
    try:
        data = out.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {display_name(out)}: {os_reason(e)}") from None
    *lines, tail = data.split(b"\n")
    rows = [(raw, True) for raw in lines] + ([(tail, False)] if tail else [])
    keys: set[Key] = set()
    good = 0  # bytes of whole lines kept
    for n, (raw, whole) in enumerate(rows, 1):
        if not raw.strip():
            good += len(raw) + whole
            continue
        try:
            record, parsed = json.loads(raw.decode("utf-8")), True
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            record, parsed = None, False
        key = _record_key(record)
        if key is not None and whole:
            keys.add(key)
            good += len(raw) + 1
            continue
        looks_ours = raw.startswith(RECORD_PREFIX) or RECORD_PREFIX.startswith(raw)
        if n == len(rows) and (not whole or not parsed) and looks_ours:
            break  # a torn write (cut inside the line or before its newline): cut off, its item is redone
        why = "not valid JSON" if not parsed else "not a vl2edge result line" if key is None else "missing its newline"
        raise InputError(f"{display_name(out)}: line {n} is {why}; --resume stops rather than drop a line a "
                         "batch job did not write (fix or delete it, then resume)")
    return keys, good


class ResultWriter:
    """Appends result lines to the output file, each whole and fsync'd, or not at all."""

    def __init__(self, path: Path):
        self.name, self.lines = display_name(path), 0
        ignore_file_size_signal()  # a write past RLIMIT_FSIZE then fails with EFBIG instead of killing us
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o644)
            self.size = os.fstat(self.fd).st_size
        except OSError as e:
            raise InputError(f"cannot write {self.name}: {os_reason(e)}") from None

    def write(self, record: dict) -> None:
        data = _encode(record)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                if not written:
                    raise OSError(28, os.strerror(28))  # ENOSPC
                view = view[written:]
            os.fsync(self.fd)
        except OSError as e:
            with contextlib.suppress(OSError):  # drop the part-line: the file keeps whole lines only
                os.ftruncate(self.fd, self.size)
                os.fsync(self.fd)
            raise InputError(f"cannot write {self.name}: {os_reason(e)}; the {self.lines} line(s) written in this "
                             "run are intact: make room and run again with --resume") from None
        self.size += len(data)
        self.lines += 1

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encode(record: dict) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a file name with undecodable bytes: \udcxx escapes, still valid JSON
        return (json.dumps(record) + "\n").encode("ascii")


def _check_out(out: Path, resume: bool) -> None:
    name = display_name(out)
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise InputError(f"cannot write {name}: {os_reason(e)}") from None
    if mode is not None and stat.S_ISLNK(mode):
        raise InputError(f"--out {name} is a symbolic link; vl2edge does not write through links (name the target)")
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"--out {name} is a folder; give the results file, e.g. {name}/results.jsonl")
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"--out {name} is not a regular file")
    if mode is not None and not resume:
        raise InputError(f"{name} exists; pass --resume to continue it or choose another output")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {name}: cannot create its folder ({os_reason(e)})") from None


def read_prompt_file(path, option: str = "--prompt-file") -> str:
    """The text of a prompt file: a readable regular file of at most MAX_PROMPT_FILE_BYTES of UTF-8 text; an
    InputError naming the file (and `option`) otherwise. (For `vl2edge batch --prompt-file`.)"""
    name = display_name(path)
    try:
        with open_file(path, "file") as f:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
    except InputError as e:
        raise InputError(f"cannot read {option}: {e}") from None
    except OSError as e:
        raise InputError(f"cannot read {option} {name}: {os_reason(e)}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise InputError(f"{option} {name} is over {MAX_PROMPT_FILE_BYTES:,} bytes: far beyond any context")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise InputError(f"{option} {name} is not valid UTF-8 text (byte {e.start})") from None


def read_prompts_file(path) -> list[str]:
    """The prompts of a --prompts file: a JSON list of strings, or one prompt per line (blank lines skipped);
    1 to MAX_PROMPTS of them, no two alike (a result line is found again by its prompt)."""
    name, text = display_name(path), read_prompt_file(path, "--prompts")
    if text.startswith("["):
        try:
            prompts = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(f"--prompts {name} starts like a JSON list but is not valid JSON ({e})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"--prompts {name}: a JSON --prompts file is a list of strings")
        prompts = [p.strip() for p in prompts]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise InputError(f"--prompts {name} holds {len(prompts)} prompts; give 1 to {MAX_PROMPTS}")
    twice = next((p for i, p in enumerate(prompts) if p in prompts[:i]), None)
    if twice is not None:
        raise InputError(f"--prompts {name} asks {twice[:60]!r} twice; each prompt once")
    for p in prompts:
        check_text(p, "a prompt", InputError)
    return prompts


def once(load: Loader) -> Loader:
    """`load`, run at the first call only, an image file decoded there: a page asked several prompts is read
    (or rendered) once."""
    done: list = []

    def again():
        if not done:
            try:
                value = load()
                done.append((load_image(value) if isinstance(value, (str, Path)) else value, None))
            except VL2Error as e:
                done.append((None, e))
        value, error = done[0]
        if error is not None:
            raise error
        return value
    return again


def parsed_json(text: str):
    """A structured answer as a value (None when its token budget ran out before the JSON closed)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def run_batch(pipe, inputs: list[str], prompt: str | list[str], out, resume: bool = False, progress: bool = True,
              answer: Callable[[Iterator], Iterator[dict | None]] | None = None, **gen_kw) -> dict:
    """Answer `prompt` about every image/page, or each of a list of prompts (each page read once; each line
    then carries its `prompt`); returns counts {"done", "skipped", "failed"}. With the pipeline's batching
    engine on (`Pipeline.start_batching`), up to its `max_batch` answers run together; the results are still
    written in input order, each whole before the next. `answer`: what turns the items to do into records
    instead of `answer_items` over `pipe` (`vl2edge.ray_batch.RayJob`; `pipe` is then None)."""
    asked: list[str | None] = [None] if isinstance(prompt, str) else list(prompt)
    for p in [prompt] if isinstance(prompt, str) else prompt:
        check_text(p, "the prompt", InputError)
    files = expand(inputs)
    out = Path(out)
    _check_out(out, resume)
    seen: set[Key] = set()
    if resume and out.exists():
        seen, good = read_done(out)
        if good < out.stat().st_size:
            try:
                os.truncate(out, good)
            except OSError as e:
                raise InputError(f"cannot cut the torn last line of {display_name(out)}: {os_reason(e)}") from None
            print(f"[vl2edge] batch: cut a torn last line off {display_name(out)}; its item is redone", file=sys.stderr)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="batch", disable=None)

    def todo() -> Iterator[tuple[dict, Loader] | None]:
        """(record so far, its image loader) of each item not done yet; None where a file ends (the bar)."""
        for path in files:
            source_path = canonical(path)
            for page, load in items(path):
                read = once(load) if len(asked) > 1 else load
                for p in asked:
                    if (source_path, page, p) in seen:
                        counts["skipped"] += 1
                        continue
                    record = {"source": str(path), "source_path": source_path, "page": page}
                    yield (record | {"prompt": p} if p is not None else record), read
            yield None

    with ResultWriter(out) as writer:
        single = prompt if isinstance(prompt, str) else None  # else each line carries its prompt
        records = answer(todo()) if answer is not None else answer_items(pipe, single, todo(), gen_kw)
        for record in records:
            if record is None:
                if bar:
                    bar.update(1)
                continue
            writer.write(record)
            counts["failed" if "error" in record else "done"] += 1
            seen.add((record["source_path"], record["page"], record.get("prompt")))
    if bar:
        bar.close()
    return counts


def answer_items(pipe, prompt: str | None, work: Iterator[tuple[dict, Loader] | None],
                 gen_kw: dict) -> Iterator[dict | None]:
    """Each item's record completed with its answer (or its error), in the order of `work`; a None in `work`
    passes through. Up to the pipeline's batch (`Pipeline.start_batching`) answers run at once, from worker
    threads, sharing the engine's decode steps; images are loaded here, in order (PDF rendering is not
    thread-safe)."""
    def answer(record: dict, image) -> dict:
        asked = record.get("prompt", prompt)  # a --prompts job's line carries its prompt (`prompt` is None)
        assert isinstance(asked, str)
        content = asked if "<image>" in asked else "<image>\n" + asked
        try:
            if isinstance(image, VL2Error):
                raise image
            res = pipe.chat([{"role": "user", "content": content}], [image], **gen_kw)
            record |= {"answer": res.text, "boxes": [b.as_dict() for b in res.boxes],
                       "finish_reason": res.finish_reason, "timings": res.timings}
            if gen_kw.get("response_format") is not None:  # structured: the answer parsed, or null
                record["json"] = parsed_json(res.text)
        except VL2Error as e:
            record["error"] = str(e)
        return record

    window = pipe.engine.max_batch if pipe.engine is not None else 1
    in_flight: collections.deque[Future | None] = collections.deque()

    def oldest(everything: bool) -> Iterator[dict | None]:
        """The finished head of the line: while the window is full or a file-end marker leads (all at the end)."""
        while in_flight and (everything or in_flight[0] is None or sum(f is not None for f in in_flight) >= window):
            future = in_flight.popleft()
            yield None if future is None else future.result()

    with ThreadPoolExecutor(window, thread_name_prefix="vl2edge-batch") as pool:
        try:
            for item in work:
                if item is None:
                    in_flight.append(None)
                else:
                    record, load = item
                    try:
                        image = load()
                    except VL2Error as e:
                        image = e
                    in_flight.append(pool.submit(answer, record, image))
                yield from oldest(everything=False)
            yield from oldest(everything=True)
        finally:  # the consumer stopped (a failed write, Ctrl-C): what has not started is not started
            for future in in_flight:
                if future is not None:
                    future.cancel()
