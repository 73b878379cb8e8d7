"""Which experts of a layer stay in device slots during decode: the hot-set policy, pure host arithmetic.

The static decode step counts how often each expert was routed to (a device tensor, read once per token).
`HotSet.observe(counts)` turns those counts into the slot changes to make before the next token:

- `lfru` (default): a routing frequency that decays each token (score <- DECAY * score + count), so an
  expert used often stays while one used long ago fades, plus a bonus for the token just routed
  (RECENT_BONUS * count: the next token reuses many of its experts); ties go to the more recent. An expert
  is admitted only by displacing a resident ranked below it. On skewed synthetic routing it serves more
  routings from slots than LRU at every share resident, with and without token-to-token reuse
  (bench/offload_policy.py, numbers in bench/RESULTS.md).
- `lru`: recency only (the most recently routed experts stay), the baseline it is measured against
  (bench/offload_policy.py).

At most `max_swaps` experts change per token and layer, so a burst of new experts cannot stall a token
with copies. The policy never reads or moves weights; `OffloadedExperts.rebalance` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

POLICIES = ("lfru", "lru")
DECAY = 0.9  # per token: an expert's weight halves in ~7 tokens without use
RECENT_BONUS = 3.0  # rank weight of the last token's routings, on top of the decayed frequency


@dataclass
class HotSet:
    n_experts: int
    n_slots: int
    policy: str = "lfru"
    max_swaps: int = 8
    score: np.ndarray = field(init=False)
    last_used: np.ndarray = field(init=False)
    recent: np.ndarray = field(init=False)
    resident: set[int] = field(default_factory=set)
    step: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown hot-set policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        self.score = np.zeros(self.n_experts)
        self.last_used = np.full(self.n_experts, -1)
        self.recent = np.zeros(self.n_experts)

    def rank(self) -> np.ndarray:
        """Expert ids, hottest first."""
        if self.policy == "lru":
            return np.argsort(-self.last_used, kind="stable")
        return np.lexsort((-self.last_used, -(self.score + RECENT_BONUS * self.recent)))  # score, then recency

    def observe(self, counts: np.ndarray) -> tuple[list[int], list[int]]:
        """One token's routing counts [E] -> (admit, evict): experts to copy in, residents to drop (pairwise:
        admit[i] takes evict[i]'s slot, or a free slot where evict is shorter)."""
        self.step += 1
        used = counts > 0
        self.last_used[used] = self.step
        self.score = DECAY * self.score + counts
        self.recent = counts
        order = [int(e) for e in self.rank() if self.last_used[e] >= 0]
        want = order[: self.n_slots]
        admit = [e for e in want if e not in self.resident][: self.max_swaps]
        free = self.n_slots - len(self.resident)
        coldest = sorted(e for e in self.resident if self.last_used[e] < 0)  # never routed: placed by prefill
        coldest += [e for e in reversed(order) if e in self.resident and e not in want]
        evict = coldest[: max(0, len(admit) - free)]
        admit = admit[: free + len(evict)]
        self.resident.difference_update(evict)
        self.resident.update(admit)
        return admit, evict

    def sync(self, resident: set[int]) -> None:
        """Adopt the residents another path placed (the eager prefill's LRU slots)."""
        self.resident = set(resident)
