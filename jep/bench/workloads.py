"""Routings and group sizes for the benchmarks: uniform, Zipf-skewed, or all to one expert; and
the operands of a grouped GEMM, and its weights quantized for the FP8 products.

For group sizes, "uniform" is the same number of rows in every group, and "random" the sizes
that routing each row to a uniformly random group gives (a multinomial draw: about M / G rows
a group, never on a block boundary, as a layer's groups come); for expert ids both are uniform
random routing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jep import fp8

ROUTINGS = ("uniform", "random", "zipf", "one-hot")


def expert_ids(routing: str, rng: np.random.Generator, shape: tuple[int, int], num_experts: int,
               top_k: int) -> np.ndarray:
    """i32[*shape, k] distinct experts per token. zipf: expert popularity ~ 1 / rank (the ranks
    shuffled); one-hot: every token's experts are 0..k-1, all on the first rank."""
    if routing == "one-hot":
        return np.broadcast_to(np.arange(top_k, dtype=np.int32), (*shape, top_k)).copy()
    if routing in ("uniform", "random"):
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
    if routing == "random":
        return rng.multinomial(rows, np.full(groups, 1.0 / groups)).astype(np.int32)
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    weights = np.ones(groups) if routing == "uniform" else 1.0 / rng.permutation(np.arange(1, groups + 1))
    sizes = np.floor(rows * weights / weights.sum()).astype(np.int64)
    sizes[np.argmax(weights)] += rows - sizes.sum()
    return sizes.astype(np.int32)


def gemm_operands(routing: str, rng: np.random.Generator, shape: tuple[int, int, int, int],
                  dtype, rotation: int = 2) -> list[tuple]:
    """`rotation` sets of grouped-GEMM operands for shape (M, K, N, G): x [M, K], w [G, K, N]
    (scaled by 1/sqrt(K)), dy [M, N] in `dtype`, and group sizes i32[G] after `routing`. Each
    set lives in buffers of its own, as `timing.repeat_rotated` takes them. The arrays are drawn
    on the device (w alone is 3.8 G elements at 7168 x 2048 with 256 groups), seeded from `rng`."""
    m, k, n, g = shape
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 3 * rotation)
    normal = jax.jit(lambda key, shape, scale: jax.random.normal(key, shape, dtype)
                     * jnp.asarray(scale, dtype), static_argnums=(1, 2))
    sets = []
    for r in range(rotation):
        sizes = jnp.asarray(group_sizes(routing, rng, m, g))
        sets.append((normal(keys[3 * r], (m, k), 1.0), normal(keys[3 * r + 1], (g, k, n), k**-0.5),
                     normal(keys[3 * r + 2], (m, n), 1.0), sizes))
    return sets


# `jep.fp8.quantize_weight` for the FP8 products' operands, jitted: run op by op it holds float32
# copies of w (14 GiB each at [256, 7168, 2048]), more than an 80 GB GPU has beside the operands.
quantize_weight = jax.jit(fp8.quantize_weight)
