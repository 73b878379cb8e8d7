"""Which hot-set policy keeps more routings in device slots: decayed frequency + recency (`lfru`) vs LRU.

    python bench/offload_policy.py [--tokens 2000] [--experts 64] [--k 6]

Drives `vl2edge.models.hot_set.HotSet` (the policy the static decode step's offloading runs) with routing
streams and counts the routings a slot served (the resident set before each token's rebalance), at 50, 25
and 12.5 % of the experts resident. Streams: `skewed` (bench.common.SkewedRouting: Zipf 1.1 over experts,
60 % of a token's experts reused from the previous token — the shape of real MoE traffic), `skewed-no-reuse`
(Zipf only), `uniform` (what random weights route like) and `phases` (the skewed stream with its expert
ranking re-drawn every 250 tokens: a document moving between content types). Pure host arithmetic, no model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SkewedRouting
from vl2edge.models.hot_set import POLICIES, HotSet


def stream(kind: str, n: int, E: int, k: int, seed: int) -> list[list[int]]:
    if kind == "uniform":
        rng = np.random.default_rng(seed)
        return [list(rng.choice(E, k, replace=False)) for _ in range(n)]
    reuse = 0.0 if kind == "skewed-no-reuse" else 0.6
    if kind == "phases":
        return [t for p in range(0, n, 250) for t in stream("skewed", min(250, n - p), E, k, seed + p)]
    routing = SkewedRouting(E, k, reuse=reuse, seed=seed)
    return [routing.next() for _ in range(n)]


def hit_rate(policy: str, rows: list[list[int]], E: int, slots: int) -> float:
    hot, served, total = HotSet(E, slots, policy), 0.0, 0.0
    for r in rows:
        counts = np.bincount(r, minlength=E).astype(float)
        served += sum(counts[e] for e in hot.resident)
        total += counts.sum()
        hot.observe(counts)
    return served / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    print(f"hit rate (routings served from a slot), {a.experts} experts, top-{a.k}, {a.tokens} tokens, "
          f"mean of {a.seeds} seeds")
    print("| stream | resident | " + " | ".join(POLICIES) + " |")
    print("|---|---|" + "---|" * len(POLICIES))
    for kind in ("skewed", "skewed-no-reuse", "phases", "uniform"):
        for share in (0.5, 0.25, 0.125):
            slots = round(share * a.experts)
            rates = [np.mean([hit_rate(p, stream(kind, a.tokens, a.experts, a.k, s), a.experts, slots)
                              for s in range(a.seeds)]) for p in POLICIES]
            print(f"| {kind} | {share:.1%} | " + " | ".join(f"{r:.1%}" for r in rates) + " |")


if __name__ == "__main__":
    main()
