"""`vl2edge` command line: one entry point, a subcommand per job; each parses and calls one function.

    vl2edge run    --model M --image FILE --prompt TEXT [--draw out.png] [--json]
    vl2edge chat   --model M [--image FILE]                 a terminal conversation (/image, /reset, /quit)
    vl2edge batch  --model M INPUTS... --prompt TEXT --out results.jsonl [--resume]
    vl2edge serve  --model M [--port 8000] [--api-key KEY] [--allowed-root DIR]
    vl2edge info   --model M [--gpu-memory 8GiB] [--ram 16GiB]
    vl2edge quantize SRC DST --recipe int4-experts         float checkpoint -> quantized model directory
    vl2edge export --model SRC --out DST                    quantize + trace to ONNX (the [export] extra)

User mistakes (a `VL2Error`) print one line and exit with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys

from .errors import InputError, VL2Error

DEFAULT_MAX_BATCH = 8  # serve and batch: answers decoded together (bench/serve_load.py, bench/RESULTS.md)


def peak_memory() -> dict:
    """Peak resident memory of this process and, when CUDA was used, peak GPU memory (bytes)."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def build_prompt(prompt: str, n_images: int) -> str:
    """Put one `<image>` line per image in front of the question unless the prompt places them itself."""
    return prompt if "<image>" in prompt or n_images == 0 else "<image>\n" * n_images + prompt


def _load_kw(a) -> dict:
    """`pipeline.load`'s keywords from the model options."""
    return {"device": a.device, "dtype": a.dtype, "gpu_memory": a.gpu_memory, "quant": a.quant, "backend": a.backend,
            "vision": a.vision_graph, "graph": not a.no_graph, "force": a.force, "prefix_cache": a.prefix_cache}


def _load(a):
    from .pipeline import load

    pipe = load(a.model, **_load_kw(a))
    if pipe.plan is not None and not getattr(a, "json", False):
        print(pipe.plan, file=sys.stderr)
    return pipe


def _gen(a) -> dict:
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
            "repetition_penalty": a.repetition_penalty, "seed": a.seed, "response_format": _json_format(a)}


def _json_format(a):
    """--json-schema FILE (or `object` for any JSON object) as a compiled `JsonFormat`; None without it."""
    if a.json_schema is None:
        return None
    from .schema import load_file
    from .structured import JsonFormat

    if a.json_schema == "object":
        return JsonFormat.any_object()
    schema = load_file(a.json_schema, f"--json-schema {a.json_schema}")
    try:
        return JsonFormat.from_schema(schema, os.path.basename(a.json_schema))
    except InputError as e:
        raise InputError(f"--json-schema {a.json_schema}: {e}") from None


def _offload_line(pipe) -> str | None:
    if pipe.plan is None:
        return None
    from .models.offload import offload_stats

    o = offload_stats(pipe.backend)
    if not o["hits"] + o["misses"]:
        return None
    acc = "-" if o["prefetch_accuracy"] is None else f"{o['prefetch_accuracy']:.0%}"
    return (f"[vl2edge] offload: {o['hits']} hits, {o['misses']} misses (hit rate {o['hit_rate']:.0%}), "
            f"{o['prefetched']} prefetched (accuracy {acc}), {o['bytes_copied'] / 1e6:.1f} MB copied, "
            f"stall {o['stall_s'] * 1e3:.1f} ms, {o['cpu_computed']} computed on the CPU")


def _stats(res) -> str:
    t, mem = res.timings, peak_memory()
    rate = f"{t['decode_tok_s']:.1f} tok/s" if t["decode_tok_s"] else "-"
    gpu = f" · peak GPU {mem['peak_gpu_bytes'] / 1e9:.2f} GB" if "peak_gpu_bytes" in mem else ""
    return (f"[vl2edge] {res.prompt_tokens} prompt + {t['new_tokens']} new tokens ({res.finish_reason}) · "
            f"TTFT {t['ttft_s']:.2f} s · {rate} · peak RSS {mem['peak_rss_bytes'] / 1e9:.2f} GB{gpu}")


def run(a) -> None:
    from .grounding import draw_format, save_drawing

    if a.draw:
        draw_format(a.draw)
    options = _gen(a)  # a --json-schema file is read and compiled before the model loads
    pipe = _load(a)
    messages = [{"role": "<|User|>", "content": build_prompt(a.prompt, len(a.image))},
                {"role": "<|Assistant|>", "content": ""}]
    gen = pipe.generation(messages, a.image, **options)
    for piece in gen:
        if not a.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    res = gen.result
    if a.draw:
        if not a.image:
            raise InputError("--draw needs an image")
        from .images import load_image

        save_drawing(load_image(a.image[-1]), res.boxes, a.draw)
    if a.json:
        extra = {}
        if pipe.plan is not None:
            from .models.offload import offload_stats

            extra = {"offload": offload_stats(pipe.backend)}
        print(json.dumps({"model": a.model, "text": res.text, "token_ids": res.token_ids,
                          "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                          "boxes": [b.as_dict() for b in res.boxes], "grounding_problems": res.grounding_problems,
                          "timings": res.timings, **peak_memory(), **extra}, indent=2))
        return
    print(file=sys.stderr)
    for b in res.boxes:
        print(f"[vl2edge] box {b.label!r}: {b.pixels if b.pixels else b.norm}", file=sys.stderr)
    print(_stats(res), file=sys.stderr)
    line = _offload_line(pipe)
    if line:
        print(line, file=sys.stderr)


def chat(a, stdin=None) -> None:
    """A terminal conversation. /image PATH attaches a picture to the next message; /reset; /quit.
    Bad input (a line that is not UTF-8, a bad picture, an over-long prompt) prints one line; the session goes on."""
    from .images import display_name, load_image
    from .schema import check_text

    stdin = stdin or sys.stdin
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    if hasattr(stdin, "reconfigure"):  # undecodable bytes become lone surrogates, refused line by line below,
        stdin.reconfigure(errors="surrogateescape")  # instead of an exception that discards the buffered input
    options = _gen(a)  # a --json-schema file is read and compiled before the model loads
    pipe = _load(a)
    messages: list[dict[str, str]]
    images: list[object]  # decoded when attached: a file that breaks later cannot break every turn after
    messages, images, pending = [], [], []

    def attach(path: str) -> None:
        try:
            pending.append(load_image(path))
            print(f"(attached {display_name(path)})", file=sys.stderr)
        except InputError as e:
            print(f"vl2edge: {e}", file=sys.stderr)

    for path in a.image:
        attach(path)
    print("vl2edge chat — /image PATH to attach a picture, /reset to start over, /quit to leave", file=sys.stderr)
    while True:
        try:
            line = input("> ") if stdin is sys.stdin else stdin.readline()
        except EOFError:
            break
        except UnicodeDecodeError:
            print("vl2edge: that line is not valid UTF-8 text; type it again", file=sys.stderr)
            continue
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages, images, pending = [], [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            attach(line[len("/image"):].strip())
            continue
        user = {"role": "user", "content": build_prompt(line, len(pending))}
        try:
            check_text(line, "that message", InputError)
            gen = pipe.generation([*messages, user], images + pending, **options)
            for piece in gen:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except VL2Error as e:
            print(f"vl2edge: {e}", file=sys.stderr)
            continue
        print()
        messages += [user, {"role": "assistant", "content": gen.result.text}]
        images, pending = images + pending, []


def batch(a) -> None:
    from .batch import read_prompt_file, read_prompts_file, run_batch

    if sum(x is not None for x in (a.prompt, a.prompt_file, a.prompts)) != 1:
        raise InputError("give exactly one of --prompt, --prompt-file and --prompts")
    prompt: str | list[str] = a.prompt if a.prompt is not None else read_prompt_file(a.prompt_file) \
        if a.prompt_file is not None else read_prompts_file(a.prompts)
    gen = _gen(a)
    if a.ray is not None:
        from .config import VL2Config
        from .ray_batch import RayJob

        model = a.model
        if os.path.isdir(model):
            model = os.path.abspath(model)  # the actors' working directory is not ours
            VL2Config.from_pretrained(model)  # a wrong model fails here, in one line, not in every actor
        single = prompt if isinstance(prompt, str) else None  # else each line carries its prompt
        job = RayJob(model, _load_kw(a), single, gen, address=None if a.ray == "local" else a.ray, actors=a.actors,
                     cpus=a.cpus_per_actor, gpus=a.gpus_per_actor, max_batch=a.max_batch)
        counts = run_batch(None, a.inputs, prompt, a.out, resume=a.resume, answer=job)
    else:
        pipe = _load(a)
        pipe.start_batching(a.max_batch)
        counts = run_batch(pipe, a.inputs, prompt, a.out, resume=a.resume, **gen)
    print(f"[vl2edge] batch: {counts['done']} answered, {counts['failed']} failed, {counts['skipped']} already "
          f"done -> {a.out}", file=sys.stderr)


def serve(a) -> None:
    try:
        from .server import Limits
        from .server import serve as run_server
    except ImportError:
        raise InputError("vl2edge serve needs the serve extra: pip install 'vl2edge[serve]'") from None
    from . import serve_options

    key = serve_options.api_key(a.api_key if a.api_key is not None else os.environ.get("VL2EDGE_API_KEY"))
    root = serve_options.allowed_root(a.allowed_root)
    origins = serve_options.cors_origins(a.cors_origin)
    serve_options.port_free(a.host, a.port)
    pipe = _load(a)
    pipe.start_batching(a.max_batch)
    name = a.served_name or os.path.basename(str(a.model).rstrip("/"))
    aliases = tuple(n for n in dict.fromkeys((str(a.model), str(a.model).rstrip("/"))) if n != name)
    print(f"[vl2edge] serving {a.model} on http://{a.host}:{a.port}/v1 "
          f"({'API key required' if key else 'no API key'}); model names: {', '.join((name, *aliases))}"
          f"{'' if a.no_ui else f'; chat page: http://{a.host}:{a.port}/'}",
          file=sys.stderr)
    run_server(pipe, host=a.host, port=a.port, name=name, aliases=aliases, cors_origins=origins,
               ui=not a.no_ui,
               api_key=key, allowed_root=root, allow_remote=a.allow_remote_images,
               max_queue=a.max_queue, limits=Limits(max_output_tokens=a.max_tokens))


def info(a) -> None:
    from pathlib import Path

    from .config import VL2Config
    from .info import report
    from .placement import parse_bytes
    from .presets import PRESETS, preset

    if a.model in PRESETS:
        config = preset(a.model)
    elif Path(a.model).is_dir():
        config = VL2Config.from_pretrained(a.model)
    else:
        config = VL2Config.from_pretrained(_hub_config(a.model))
    print(report(config, gpu_memory=parse_bytes(a.gpu_memory) if a.gpu_memory else None,
                 ram=parse_bytes(a.ram) if a.ram else None, context=a.context, name=a.model))


def quantize(a) -> None:
    from .quant.convert import convert
    from .quant.recipes import Recipe
    from .weights import disk_size

    recipe = Recipe(a.recipe, a.block_size, a.algorithm, a.symmetric, a.vision_int8)
    out = convert(a.src, a.dst, recipe, overwrite=a.overwrite)
    print(f"wrote {out} ({recipe.label}, {disk_size(out) / 1e6:,.1f} MB)")


def export(a) -> None:
    try:
        from .export.build import export as run_export
    except ImportError as e:
        raise InputError(f"vl2edge export needs the export extra ({e.name} is missing): "
                         "pip install 'vl2edge[export]'") from None
    out = run_export(a.model, a.out, a.recipe, a.block_size, a.vision, a.accuracy_level, overwrite=a.overwrite,
                     calibration=a.calibration_images, force=a.force)
    m = json.loads((out / "manifest.json").read_text())
    print(f"wrote {out} ({a.recipe}, {m['export_seconds']} s); verification against torch: "
          + ", ".join(f"{k} rel-L2 {v['rel_l2']:.1e}" for k, v in m["verification"].items()))


def verify(a) -> None:
    """An export's files against its manifest's sha256; a checkpoint's tensors against its config."""
    from pathlib import Path

    from .artifact import MANIFEST, SEAL, is_onnx_dir, read_manifest, seal_problem, verify_files
    from .errors import CheckpointError

    root = Path(a.dir)
    if is_onnx_dir(root):
        sealed = seal_problem(root)
        if sealed is not None and (root / SEAL).exists():
            raise CheckpointError(f"{root}: {sealed}")
        m = read_manifest(root)
        listed = m.get("files", {})
        if not listed:
            raise CheckpointError(f"{root}: {MANIFEST} lists no files and their sha256: nothing could be verified")
        bad = verify_files(root)
        if bad:
            raise CheckpointError(f"{root}: {len(bad)} file(s) are missing or differ from manifest.json's sha256: "
                                  f"{', '.join(bad[:8])}")
        unlisted = sorted(p.name for p in root.iterdir() if p.name not in {*listed, MANIFEST, SEAL})
        print(f"{root}: ONNX export, all {len(listed)} files match {MANIFEST}"
              + ("" if sealed else f", which matches {SEAL}")
              + (f"; not checked: {MANIFEST} itself ({sealed})" if sealed else "")
              + (f"; not checked (not in the manifest): {', '.join(unlisted[:8])}" if unlisted else ""))
        return
    from .config import VL2Config
    from .quant.recipes import packed_tensor_shapes
    from .quant.recipes import read_manifest as read_quantization
    from .weights import Checkpoint

    config = VL2Config.from_pretrained(root)
    ck = Checkpoint.open(root)
    stored = read_quantization(root)
    shapes = config.tensor_shapes()
    expected = packed_tensor_shapes(shapes, stored) if stored else {k: (None, s) for k, s in shapes.items()}
    ck.check_keys(expected, "config.json")
    ck.check_shapes({k: s for k, (_, s) in expected.items()})
    ck.check_dtypes({k: dt for k, (dt, _) in expected.items()})
    for name in ck.where:  # every byte readable: a file cut short after its header fails here
        ck.numpy(name).sum()
    print(f"{root}: {'quantized' if stored else 'float'} checkpoint, {len(ck.keys())} tensors in "
          f"{len(ck.files)} file(s) match config.json")


def _hub_config(repo: str):
    from .errors import CheckpointError

    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, "config.json")
    except Exception as e:
        raise CheckpointError(f"{repo}: not a model directory, a preset, or a reachable Hugging Face id "
                              f"({type(e).__name__})") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vl2edge", description="DeepSeek-VL2 on hardware people own.")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", required=True, help="model directory (checkpoint, quantized or ONNX export) "
                                                      "or Hugging Face id, e.g. deepseek-ai/deepseek-vl2-tiny")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--backend", default=None, choices=["auto", "torch", "onnx"],
                       help="auto (default, or $VL2EDGE_BACKEND): a float checkpoint on a machine without a CUDA GPU "
                            "runs through an int4-experts ONNX export built once into a cache; torch: the PyTorch "
                            "model; onnx: the cached export on any machine")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--vision-graph", default=None, choices=["float", "int8"],
                       help="ONNX backend: the vision graph to run (default: the export's, int8 when it passed its "
                            "accuracy gate at export time)")
        p.add_argument("--quant", choices=["int4-experts", "int8", "int4"], default=None,
                       help="quantize a float checkpoint while loading (PyTorch backend)")
        p.add_argument("--gpu-memory", metavar="SIZE", default=None,
                       help="device memory budget, e.g. 6GiB: plan the placement and stream the routed experts "
                            "that do not fit from CPU memory (PyTorch backend)")
        p.add_argument("--prefix-cache", metavar="SIZE", default=None,
                       help="memory for prompts already read (default: 2GiB, or an eighth of this machine's memory "
                            "if less; 0: off): a prompt that begins like an earlier one (a follow-up turn, another "
                            "question about the same picture) starts from it and prefills only the rest")
        p.add_argument("--no-graph", action="store_true",
                       help="CUDA: run the static decode step eagerly instead of replaying it as a CUDA graph")
        p.add_argument("--force", action="store_true",
                       help="CPU default: export and run even when config.json says the model does not fit this "
                            "machine's memory or disk")

    def gen_args(p, max_new=512):
        p.add_argument("--max-new-tokens", type=int, default=max_new)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--json-schema", metavar="FILE", default=None,
                       help="answer JSON valid against this JSON schema (constrained decoding); 'object': any "
                            "JSON object")

    r = sub.add_parser("run", help="answer one prompt about zero or more images, streaming the answer")
    model_args(r)
    r.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image file; repeat for several (each gets an <image> line unless the prompt places them)")
    r.add_argument("--prompt", required=True)
    gen_args(r)
    r.add_argument("--draw", metavar="PNG", help="save the last image with the answer's grounding boxes drawn")
    r.add_argument("--json", action="store_true", help="print one JSON object (text, boxes, timings, memory)")
    r.set_defaults(func=run)

    c = sub.add_parser("chat", help="a conversation in the terminal (/image PATH, /reset, /quit)")
    model_args(c)
    c.add_argument("--image", action="append", default=[], metavar="FILE", help="attach to the first message")
    gen_args(c)
    c.set_defaults(func=chat)

    b = sub.add_parser("batch", help="prompts over images, folders and PDFs; results as JSON lines")
    model_args(b)
    b.add_argument("inputs", nargs="+", help="image files, PDFs or folders (searched recursively)")
    b.add_argument("--prompt")
    b.add_argument("--prompt-file")
    b.add_argument("--prompts", metavar="FILE",
                   help="several prompts (one a line, or a JSON list): each page is read once and asked each, one "
                        "result line per page and prompt")
    b.add_argument("--out", required=True, help="results file (JSON lines)")
    b.add_argument("--resume", action="store_true", help="skip what --out already holds")
    b.add_argument("--max-batch", type=int_in(1, 256), default=DEFAULT_MAX_BATCH,
                   help=f"pages answered together (continuous batching; default {DEFAULT_MAX_BATCH}); results are "
                        "written in input order either way")
    b.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the job on Ray Data (the [ray] extra): on a Ray instance started here, or on the "
                        "cluster at ADDRESS (auto, ray://HOST:10001); one pipeline per actor")
    b.add_argument("--actors", type=int_in(1, 4096), default=2, help="--ray: pipelines (actors) at once (default 2)")
    b.add_argument("--cpus-per-actor", type=float, default=1.0, help="--ray: CPUs (and threads) of each actor")
    b.add_argument("--gpus-per-actor", type=float, default=0.0, help="--ray: GPUs of each actor (e.g. 1 or 0.5)")
    gen_args(b)
    b.set_defaults(func=batch)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int_in(1, 65535), default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set VL2EDGE_API_KEY)")
    s.add_argument("--allowed-root", metavar="DIR", help="serve local image paths under DIR (default: none)")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    s.add_argument("--max-queue", type=int_in(1, 1 << 16), default=16, help="requests that may wait; more get 429")
    s.add_argument("--max-tokens", type=int_in(1, 1 << 20), default=2048, help="cap on a request's max_tokens")
    s.add_argument("--max-batch", type=int_in(1, 256), default=DEFAULT_MAX_BATCH,
                   help=f"answers decoded together (continuous batching; default {DEFAULT_MAX_BATCH}, "
                        "bench/serve_load.py); 1: one at a time. Each slot holds a context of KV cache")
    s.add_argument("--served-name", help="model id reported by /v1/models (default: the directory name)")
    s.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. http://localhost:3000; '*' for any) to call the API; "
                        "repeat for several")
    s.set_defaults(func=serve)

    i = sub.add_parser("info", help="parameters, sizes per recipe and what fits where, from the config alone")
    i.add_argument("--model", required=True, help="model directory, Hugging Face id or preset name")
    i.add_argument("--gpu-memory", metavar="SIZE")
    i.add_argument("--ram", metavar="SIZE")
    i.add_argument("--context", type=int_in(1, 1 << 20), default=None,
                   help="KV cache positions to plan for (default: max)")
    i.set_defaults(func=info)

    from .quant.recipes import EXPORT_BLOCK_SIZE, EXPORT_RECIPES, RECIPES

    q = sub.add_parser("quantize", help="quantize a float checkpoint (directory or Hugging Face id) into a model "
                                        "directory vl2edge loads")
    q.add_argument("src", help="float checkpoint directory or Hugging Face id")
    q.add_argument("dst", help="model directory to write")
    q.add_argument("--recipe", required=True, choices=RECIPES,
                   help="int4-experts: routed experts 4-bit, attention/shared/dense/lm_head 8-bit; "
                        "int8: all language-model linears 8-bit; int4: all 4-bit (the router stays float)")
    q.add_argument("--block-size", type=int, default=32, choices=[32, 64, 128])
    q.add_argument("--algorithm", default="rtn", choices=["rtn", "mse"])
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="no zero points, also for 4-bit")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="zero points, also for 8-bit")
    q.add_argument("--vision-int8", action="store_true", help="also quantize the vision tower's linears to 8-bit")
    q.add_argument("--overwrite", action="store_true", help="replace DST if it already holds files")
    q.set_defaults(func=quantize)

    e = sub.add_parser("export", help="quantize a float checkpoint and export it to ONNX for the CPU backend "
                                      "(needs the [export] extra)")
    e.add_argument("--model", required=True, help="float checkpoint directory or Hugging Face id")
    e.add_argument("--out", required=True, help="artifact directory to write")
    e.add_argument("--recipe", default="int4-experts", choices=EXPORT_RECIPES,
                   help="float32 = plain ops, for verification; the others as in vl2edge quantize")
    e.add_argument("--block-size", type=int, default=None, choices=[32, 64, 128],
                   help=f"default: {EXPORT_BLOCK_SIZE} where the model's widths allow it, else 32")
    e.add_argument("--vision", default="auto", choices=["auto", "both", "float", "int8"],
                   help="vision graph variants to write (int8: statically quantized, calibrated; the default "
                        "when it passes its accuracy gate); auto (default): both where the CPU's int8 kernel is "
                        "exact (VNNI/AMX, non-x86), float alone elsewhere")
    e.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 4],
                   help="4 = int8 activations (fast on CPU: MatMulNBits/QMoE accuracy_level 4, 8-bit linears "
                        "through MatMulInteger), 0 = exact (the graph computes the torch model)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    e.add_argument("--calibration-images", metavar="DIR", help="pictures to calibrate the int8 vision graph on")
    e.add_argument("--force", action="store_true",
                   help="export even when config.json says the export does not fit this machine's memory or disk")
    e.set_defaults(func=export)

    v = sub.add_parser("verify", help="check an ONNX export's files against its sha256s, or a checkpoint against "
                                      "its config")
    v.add_argument("dir", help="export or model directory")
    v.set_defaults(func=verify)
    return ap


def int_in(lo: int, hi: int):
    """argparse type: an integer in [lo, hi] (argparse prints the usage and exits 2 otherwise)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {hi}]")
        return v

    return parse


def main(argv=None) -> None:
    from .outputs import ignore_file_size_signal, os_reason

    ignore_file_size_signal()
    a = _parser().parse_args(argv)
    try:
        a.func(a)
    except VL2Error as e:
        print(f"vl2edge: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # the environment (a full disk, permissions, a vanished file) rather than a bug
        if isinstance(e, BrokenPipeError):
            sys.stderr.close()
            sys.exit(1)
        where = f" ({e.filename})" if e.filename else ""
        print(f"vl2edge: error: {os_reason(e)}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
