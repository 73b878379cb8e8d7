"""`vl2edge` command line: one entry point, a subcommand per job; each parses and calls one function.

    vl2edge run --model PATH_OR_ID --image FILE --prompt TEXT [--json] ...

User mistakes (a `VL2Error`) print one line and exit with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

from .errors import VL2Error


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


def run(model: str, prompt: str, images: list[str], max_new_tokens: int, temperature: float, top_p: float,
        repetition_penalty: float, seed: int | None, device: str, dtype: str, as_json: bool,
        gpu_memory: str | None = None) -> None:
    from .pipeline import load

    pipe = load(model, device=device, dtype=dtype, gpu_memory=gpu_memory)
    plan = getattr(pipe.backend, "plan", None)
    if plan is not None and not as_json:
        print(plan, file=sys.stderr)
    messages = [{"role": "<|User|>", "content": build_prompt(prompt, len(images))},
                {"role": "<|Assistant|>", "content": ""}]
    gen = pipe.generation(messages, images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)
    for piece in gen:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    res = gen.result
    mem = peak_memory()
    offload = None
    if plan is not None:
        from .offload import offload_stats

        offload = offload_stats(pipe.backend)
    if as_json:
        print(json.dumps({"model": model, "text": res.text, "token_ids": res.token_ids,
                          "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                          "timings": res.timings, **mem, **({"offload": offload} if offload else {})}, indent=2))
        return
    t = res.timings
    rate = f"{t['decode_tok_s']:.1f} tok/s" if t["decode_tok_s"] else "-"
    gpu = f" · peak GPU {mem['peak_gpu_bytes'] / 1e9:.2f} GB" if "peak_gpu_bytes" in mem else ""
    print(f"\n[vl2edge] {res.prompt_tokens} prompt + {t['new_tokens']} new tokens ({res.finish_reason}) · "
          f"TTFT {t['ttft_s']:.2f} s · {rate} · peak RSS {mem['peak_rss_bytes'] / 1e9:.2f} GB{gpu}",
          file=sys.stderr)
    if offload and offload["hits"] + offload["misses"]:
        acc = offload["prefetch_accuracy"]
        print(f"[vl2edge] offload: {offload['hits']} hits, {offload['misses']} misses (hit rate "
              f"{offload['hit_rate']:.0%}), {offload['prefetched']} prefetched (accuracy "
              f"{'-' if acc is None else f'{acc:.0%}'}), {offload['bytes_copied'] / 1e6:.1f} MB copied, "
              f"stall {offload['stall_s'] * 1e3:.1f} ms, {offload['cpu_computed']} computed on the CPU",
              file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vl2edge", description="DeepSeek-VL2 on hardware people own.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer one prompt about zero or more images, streaming the answer")
    r.add_argument("--model", required=True, help="model directory or Hugging Face id "
                                                  "(e.g. deepseek-ai/deepseek-vl2-tiny)")
    r.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image file; repeat for several (each gets an <image> line unless the prompt places them)")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=int, default=512)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--repetition-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    r.add_argument("--gpu-memory", metavar="SIZE", default=None,
                   help="device memory budget, e.g. 6GiB: plan the placement and stream the routed experts that do "
                        "not fit from CPU memory (PyTorch backend)")
    r.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings, memory)")
    return ap


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    try:
        if a.command == "run":
            run(model=a.model, prompt=a.prompt, images=a.image, max_new_tokens=a.max_new_tokens,
                temperature=a.temperature, top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                device=a.device, dtype=a.dtype, as_json=a.json, gpu_memory=a.gpu_memory)
    except VL2Error as e:
        print(f"vl2edge: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
