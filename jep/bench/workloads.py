"""Routings and group sizes for the benchmarks: uniform, Zipf-skewed, or all to one expert."""

from __future__ import annotations

import numpy as np

ROUTINGS = ("uniform", "zipf", "one-hot")


def expert_ids(routing: str, rng: np.random.Generator, shape: tuple[int, int], num_experts: int,
               top_k: int) -> np.ndarray:
    """i32[*shape, k] distinct experts per token. zipf: expert popularity ~ 1 / rank (the ranks
    shuffled); one-hot: every token's experts are 0..k-1, all on the first rank."""
    if routing == "one-hot":
        return np.broadcast_to(np.arange(top_k, dtype=np.int32), (*shape, top_k)).copy()
    if routing == "uniform":
        scores = rng.random((*shape, num_experts))
    elif routing == "zipf":
        popularity = 1.0 / rng.permutation(np.arange(1, num_experts + 1))
        # Gumbel top-k: sampling k distinct experts with probabilities ~ popularity.
        scores = np.log(popularity) + rng.gumbel(size=(*shape, num_experts))
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return np.argsort(-scores, axis=-1)[..., :top_k].astype(np.int32)


def group_sizes(routing: str, rng: np.random.Generator, rows: int, groups: int) -> np.ndarray:
    """i32[groups] summing to `rows`, as the routing would spread rows over groups."""
    if routing == "one-hot":
        sizes = np.zeros(groups, np.int64)
        sizes[0] = rows
        return sizes.astype(np.int32)
    weights = np.ones(groups) if routing == "uniform" else 1.0 / rng.permutation(np.arange(1, groups + 1))
    sizes = np.floor(rows * weights / weights.sum()).astype(np.int64)
    sizes[np.argmax(weights)] += rows - sizes.sum()
    return sizes.astype(np.int32)
