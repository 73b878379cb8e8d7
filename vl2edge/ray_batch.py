"""`vl2edge batch --ray [ADDRESS]`: the batch job on Ray Data, one pipeline per actor.

The driver lists the items as `vl2edge.batch.run_batch` does (files, PDF pages; what `--resume` finds done is
left out) and hands them to Ray Data as a dataset of records (source, source_path, page). `map_batches`
runs them through a pool of `Answerer` actors (`actors` of them, each with `cpus`/`gpus`), each loading its
own pipeline once and answering its rows through its batching engine (`batch.answer_items`); the actors
read the images and render the PDF pages themselves, from `source_path`. The driver writes each record as
it comes back, in input order, whole and fsync'd (`batch.ResultWriter`): `--resume` works as for the local
job. An actor that dies is restarted (its constructor reloads the model) and its rows are run again; their
records reach the driver once, after they are whole, so nothing is lost and nothing is written twice.

Ray is the `[ray]` extra. ADDRESS is what `ray.init` takes (`auto`, `ray://host:10001`, host:port); with
none, a Ray instance is started on this machine (or the one $RAY_ADDRESS names). On a cluster every node
needs vl2edge, the model at the same path (or a hub id and the network) and the inputs on a shared path.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import socket
from collections.abc import Iterator
from pathlib import Path

from .batch import Loader, answer_items, load_item, once
from .errors import InputError

MAX_ACTORS = 4096       # as the CLI's --actors
MAX_PER_ACTOR = 1024.0  # CPUs or GPUs one actor may ask for


class Answerer:
    """A Ray Data actor: one pipeline, loaded once; a batch of record rows in, completed records out."""

    def __init__(self, model: str, load_kw: dict, max_batch: int, prompt: str | None, gen_kw: dict):
        from .pipeline import load

        self.pipe = load(model, **load_kw)
        self.pipe.start_batching(max_batch)
        self.prompt, self.gen_kw = prompt, gen_kw

    def __call__(self, batch: dict) -> dict:
        records = [json.loads(r) for r in batch["item"]]
        last: dict = {}

        def loader(r: dict):  # the lines of one page (several prompts) follow each other: render it once
            where = (r["source_path"], r["page"])
            if where not in last:
                last.clear()
                last[where] = once(functools.partial(load_item, Path(r["source_path"]), r["page"]))
            return last[where]

        work = ((r, loader(r)) for r in records)
        done = [json.dumps(r, ensure_ascii=False) for r in answer_items(self.pipe, self.prompt, work, self.gen_kw)]
        return {"record": done}


class RayJob:
    """What `run_batch(answer=...)` calls: the items to answer -> their records, in order, from Ray Data."""

    def __init__(self, model: str, load_kw: dict, prompt: str | None, gen_kw: dict, address: str | None = None,
                 actors: int = 2, cpus: float = 1, gpus: float = 0, max_batch: int = 8):
        if not (1 <= actors <= MAX_ACTORS and math.isfinite(cpus) and 0 < cpus <= MAX_PER_ACTOR
                and math.isfinite(gpus) and 0 <= gpus <= MAX_PER_ACTOR):
            raise InputError(f"--actors must be in [1, {MAX_ACTORS}], --cpus-per-actor in (0, {MAX_PER_ACTOR}] and "
                             f"--gpus-per-actor in [0, {MAX_PER_ACTOR}] (finite); got {actors}, {cpus}, {gpus}")
        self.model, self.load_kw, self.prompt, self.gen_kw = model, load_kw, prompt, gen_kw
        self.address, self.actors, self.cpus, self.gpus, self.max_batch = address, actors, cpus, gpus, max_batch
        _check_reachable(address)

    def __call__(self, work: Iterator[tuple[dict, Loader] | None]) -> Iterator[dict | None]:
        order = [None if item is None else item[0] for item in work]   # records; None where a file ends
        rows = [{"item": json.dumps(r, ensure_ascii=False)} for r in order if r is not None]
        if not rows:
            yield from order
            return
        results = self._run(rows)
        for record in order:
            yield None if record is None else next(results)

    def _run(self, rows: list[dict]) -> Iterator[dict]:
        ray = _ray()
        logging.getLogger("ray").setLevel(logging.WARNING)  # its progress lines would drown ours
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False, include_dashboard=False,
                         configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise InputError(f"cannot reach the Ray cluster at {self.address}: {str(e).splitlines()[0]}") \
                    from None
        have = ray.cluster_resources()
        for what, each in (("CPU", self.cpus), ("GPU", self.gpus)):
            if each > have.get(what, 0):  # Ray would wait for them for ever
                raise InputError(f"each actor asks for {each:g} {what}s (--{what.lower()}s-per-actor) but the Ray "
                                 f"cluster has {have.get(what, 0):g}")
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records come back in input order
        context.enable_progress_bars = False
        load_kw = {**self.load_kw, "threads": self.load_kw.get("threads") or max(1, int(self.cpus))}
        # Ray Data's actor pools restart a dead actor and rerun its tasks by default (max_restarts and
        # max_task_retries -1): tests/test_ray_batch.py kills one to hold it to that
        dataset = ray.data.from_items(rows).map_batches(
            Answerer, batch_size=self.max_batch, compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.cpus, num_gpus=self.gpus,
            fn_constructor_kwargs={"model": self.model, "load_kw": load_kw, "max_batch": self.max_batch,
                                   "prompt": self.prompt, "gen_kw": self.gen_kw})
        for row in dataset.iter_rows():
            yield json.loads(row["record"])


def _ray():
    try:
        import ray
        import ray.data  # the Data library, part of the extra
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'vl2edge[ray]'") from None
    return ray


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that refuses connections fails now: `ray.init` would retry it
    for minutes."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--ray {address[:120]}: expected auto, HOST:PORT or ray://HOST:PORT (a port 1-65535)")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
