"""xgrammar against llguidance on our tokenizer (DeepSeek-VL2's, 129,280 ids): set-up, schema compile, mask per
token, and whether random logits under each library's JSON-schema grammar put raw control characters into
strings (which a strict parser such as Python's json.loads refuses).

    python -m venv /tmp/xg && /tmp/xg/bin/pip install torch==2.13.0 xgrammar transformers -e .
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

from vl2edge.structured import string_state

VOCAB = [129280]  # the model's logits width, set from --vocab
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["merchant", "total", "items"],
          "properties": {"merchant": {"type": "string"}, "total": {"type": "number"},
                         "items": {"type": "array", "items": {"type": "string"}}}}


def raw_control_in_strings(text: str) -> bool:
    """A character below 0x20 inside a JSON string (vl2edge.structured.string_state follows the quotes)."""
    state = (False, False)
    for c in text:
        if state[0] and not state[1] and ord(c) < 0x20:
            return True
        state = string_state(*state, c)
    return False


def drive(new_matcher, fill, mask_logits, consume, done, tok, eos: int, runs: int, rng) -> dict:
    """`runs` answers of up to 60 tokens: the library's mask timed, the most likely allowed token taken."""
    out: dict = {"mask ms": [], "runs with raw control": 0}
    for _ in range(runs):
        m, ids = new_matcher(), []
        while len(ids) < 60 and not done(m):
            t = time.perf_counter()
            bits = fill(m)
            out["mask ms"].append((time.perf_counter() - t) * 1e3)
            k = int(mask_logits(rng.standard_normal((1, VOCAB[0])).astype(np.float32), bits).argmax())
            if k == eos:
                break
            consume(m, k)
            ids.append(k)
        out["runs with raw control"] += raw_control_in_strings(tok.decode(ids))
    return out


def run_llguidance(tok, eos: int, runs: int, rng) -> dict:
    import llguidance
    import llguidance.numpy as ln

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.to_str(), n_vocab=VOCAB[0], eos_token=eos)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(lt, grammar, log_level=0)
    compiled = time.perf_counter() - t1
    bits = ln.allocate_token_bitmask(1, VOCAB[0])

    def fill(m):
        ln.fill_next_token_bitmask(m, bits)
        return bits

    def mask_logits(x, b):
        ln.apply_token_bitmask_inplace(x, b)
        return x

    r = drive(lambda: llguidance.LLMatcher(lt, grammar, log_level=0), fill, mask_logits,
              lambda m, k: m.consume_token(k), lambda m: m.is_stopped(), tok, eos, runs, rng)
    return {"set-up s": t1 - t0, "compile s": compiled, **r}


def run_xgrammar(path: str, tok, eos: int, runs: int, rng) -> dict:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=path), vocab_size=VOCAB[0],
                                              stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compiled = time.perf_counter() - t1
    bits = xgr.allocate_token_bitmask(1, VOCAB[0])

    def fill(m):
        m.fill_next_token_bitmask(bits)
        return bits

    def mask_logits(x, b):
        t = torch.from_numpy(x)
        xgr.apply_token_bitmask_inplace(t, b)
        return t

    r = drive(lambda: xgr.GrammarMatcher(grammar), fill, mask_logits, lambda m, k: m.accept_token(k),
              lambda m: m.is_terminated(), tok, eos, runs, rng)
    return {"set-up s": t1 - t0, "compile s": compiled, **r}


def main() -> None:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="models/syn-tiny-ref/tokenizer.json")
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    VOCAB[0] = a.vocab
    tok = Tokenizer.from_file(a.tokenizer)
    eos = tok.token_to_id("<｜end▁of▁sentence｜>") or 1
    print("| library | set-up s | compile s | mask ms (median / p90) | runs with raw control chars in strings |")
    print("|---|---|---|---|---|")
    for name, r in (("llguidance", run_llguidance(tok, eos, a.runs, np.random.default_rng(0))),
                    ("xgrammar", run_xgrammar(a.tokenizer, tok, eos, a.runs, np.random.default_rng(0)))):
        ms = r["mask ms"]
        print(f"| {name} | {r['set-up s']:.3f} | {r['compile s']:.4f} | {np.median(ms):.3f} / "
              f"{np.percentile(ms, 90):.3f} | {r['runs with raw control']} of {a.runs} |")


if __name__ == "__main__":
    main()
