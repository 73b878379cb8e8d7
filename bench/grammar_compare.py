"""xgrammar against llguidance on our tokenizer (DeepSeek-VL2's, 129,280 ids): set-up, schema compile, mask per
token, and whether random logits under each library's JSON-schema grammar put raw control characters into
strings (which a strict parser such as Python's json.loads refuses).

    python -m venv /tmp/xg && /tmp/xg/bin/pip install torch==2.13.0 xgrammar transformers llguidance numpy tokenizers
    /tmp/xg/bin/python bench/grammar_compare.py [--tokenizer models/syn-tiny-ref/tokenizer.json] [--runs 30]

xgrammar needs torch and transformers, so it runs in its own venv (vl2edge's core does not take them);
vl2edge uses llguidance (vl2edge/structured.py). Each run: up to 60 tokens under the grammar, logits random
(seeded), the most likely allowed token taken, no closing plan (the libraries alone).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["merchant", "total", "items"],
          "properties": {"merchant": {"type": "string"}, "total": {"type": "number"},
                         "items": {"type": "array", "items": {"type": "string"}}}}


def raw_control_in_strings(text: str) -> bool:
    inside = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif inside and c == "\\":
            escaped = True
        elif c == '"':
            inside = not inside
        elif inside and ord(c) < 0x20:
            return True
    return False


def run_llguidance(tok, vocab: int, eos: int, runs: int, rng) -> dict:
    import llguidance
    import llguidance.numpy as ln

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(lt, grammar, log_level=0)
    out = {"set-up s": t1 - t0, "compile s": time.perf_counter() - t1, "mask ms": [], "runs with raw control": 0}
    for _ in range(runs):
        m, bits, ids = llguidance.LLMatcher(lt, grammar, log_level=0), ln.allocate_token_bitmask(1, vocab), []
        while len(ids) < 60 and not m.is_stopped():
            t = time.perf_counter()
            ln.fill_next_token_bitmask(m, bits)
            out["mask ms"].append((time.perf_counter() - t) * 1e3)
            x = rng.standard_normal((1, vocab)).astype(np.float32)
            ln.apply_token_bitmask_inplace(x, bits)
            k = int(x.argmax())
            if k == eos:
                break
            m.consume_token(k)
            ids.append(k)
        out["runs with raw control"] += raw_control_in_strings(tok.decode(ids))
    return out


def run_xgrammar(path: str, tok, vocab: int, eos: int, runs: int, rng) -> dict:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=path), vocab_size=vocab,
                                              stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    out = {"set-up s": t1 - t0, "compile s": time.perf_counter() - t1, "mask ms": [], "runs with raw control": 0}
    for _ in range(runs):
        m, bits, ids = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, vocab), []
        while len(ids) < 60 and not m.is_terminated():
            t = time.perf_counter()
            m.fill_next_token_bitmask(bits)
            out["mask ms"].append((time.perf_counter() - t) * 1e3)
            x = torch.from_numpy(rng.standard_normal((1, vocab)).astype(np.float32))
            xgr.apply_token_bitmask_inplace(x, bits)
            k = int(x.argmax())
            if k == eos:
                break
            m.accept_token(k)
            ids.append(k)
        out["runs with raw control"] += raw_control_in_strings(tok.decode(ids))
    return out


def main() -> None:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="models/syn-tiny-ref/tokenizer.json")
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    tok = Tokenizer.from_file(a.tokenizer)
    eos = tok.token_to_id("<｜end▁of▁sentence｜>") or 1
    print("| library | set-up s | compile s | mask ms (median / p90) | runs with raw control chars in strings |")
    print("|---|---|---|---|---|")
    for name, r in (("llguidance", run_llguidance(tok, a.vocab, eos, a.runs, np.random.default_rng(0))),
                    ("xgrammar", run_xgrammar(a.tokenizer, tok, a.vocab, eos, a.runs, np.random.default_rng(0)))):
        ms = r["mask ms"]
        print(f"| {name} | {r['set-up s']:.3f} | {r['compile s']:.4f} | {np.median(ms):.3f} / "
              f"{np.percentile(ms, 90):.3f} | {r['runs with raw control']} of {a.runs} |")


if __name__ == "__main__":
    main()
