"""Router: scores -> (weights, expert_ids), and the balancing losses computed from them.

Shapes: T tokens, E experts, k = top_k, G = num_groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jep import _checks
from jep.platform import current_platform
from jep.config import SCORES


def router_scores(logits: jax.Array, score: str = "softmax") -> jax.Array:
    """f32[T, E] router scores: softmax over experts, or an independent sigmoid per expert."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)


# Experts per block of `best_k`'s first stage, by platform: the fastest at E = 4096, k = 8 (CPU:
# of 16, 32, 64, 128; one H200: 94 us with 16 against 104-207 us with 8, 32, 64, 128 and 578 us
# for lax.top_k), and the largest share of E its second stage may read.
_TOP_K_BLOCK = {"cpu": 32, "gpu": 16}
_TOP_K_MAX_SHARE = 4


def best_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(values, k)` over the last axis of [T, E] (float or int): the same values and
    indices, ties to the lower index; i32 indices.

    On the CPU and GPUs with many experts (E a multiple of the platform's block b, k * b <=
    E / 4) it runs in two stages: the maxima of contiguous blocks of b experts (one pass over
    the values), the k blocks with the largest maxima (ties to the lower block), then the top k
    of those blocks' k * b values. A value outside those blocks has k block maxima at least as
    large before it, so it is not among the top k; as the blocks are taken in ascending order,
    their values keep the experts' order and ties go to the lower index as in `lax.top_k`.
    XLA's `top_k` over E columns costs about a sort of each row (CPU) or grows steeply with E
    (GPU: 578 us at E = 4096, 4096 rows, k = 8 on an H200, against 94 us in two stages); this
    reads the [T, E] values once and ranks a quarter of them or fewer. The gradient reaches the
    chosen values only, as `lax.top_k`'s does.
    """
    num = values.shape[-1]
    block = _TOP_K_BLOCK.get(current_platform())
    if block is None or values.ndim != 2 or num % block or k * block * _TOP_K_MAX_SHARE > num:
        top, ids = lax.top_k(values, k)
        return top, ids.astype(jnp.int32)
    return _blocked_top_k(values, k, block)


def _blocked_top_k(values: jax.Array, k: int, block: int):
    """`best_k`'s two stages over blocks of `block` experts (E a multiple of it, k <= E / block)."""
    rows, num = values.shape
    blocks = lax.stop_gradient(values).reshape(rows, num // block, block)
    _, chosen = lax.top_k(blocks.max(axis=2), k)  # [T, k]
    chosen = jnp.sort(chosen, axis=-1)
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(rows, k * block)
    _, position = lax.top_k(candidates, k)
    ids = (jnp.take_along_axis(chosen, position // block, axis=1) * block
           + position % block).astype(jnp.int32)
    return jnp.take_along_axis(values, ids, axis=1), ids


def _group_mask(choice: jax.Array, num_groups: int, topk_groups: int) -> jax.Array:
    """bool[T, E]: experts inside each token's `topk_groups` best groups.

    A group's score is the sum of its two best choice scores (DeepSeek-V3), or its only score
    when groups hold one expert.
    """
    num_tokens, num_experts = choice.shape
    grouped = choice.reshape(num_tokens, num_groups, num_experts // num_groups)
    best = lax.top_k(grouped, min(2, grouped.shape[-1]))[0]
    group_score = best.sum(-1)  # [T, G]
    _, top_groups = lax.top_k(group_score, topk_groups)  # [T, topk_groups]
    keep = jnp.zeros((num_tokens, num_groups), bool)
    keep = keep.at[jnp.arange(num_tokens)[:, None], top_groups].set(True)
    return jnp.repeat(keep, num_experts // num_groups, axis=1)


def selection_scores(scores: jax.Array, *, num_groups: int | None = None,
                     topk_groups: int | None = None, bias: jax.Array | None = None) -> jax.Array:
    """f32[T, E], what `route` ranks experts by (no gradient): the scores plus the selection
    bias, -inf outside each token's `topk_groups` best groups under group-limited routing."""
    choice = scores if bias is None else scores + lax.stop_gradient(bias.astype(jnp.float32))
    choice = lax.stop_gradient(choice)
    if num_groups is not None:
        choice = jnp.where(_group_mask(choice, num_groups, topk_groups), choice, -jnp.inf)
    return choice


@jax.named_scope("jep_route")  # how a profile of a step finds routing (jep.bench.profile)
def route(
    logits: jax.Array,
    *,
    top_k: int,
    score: str = "softmax",
    num_groups: int | None = None,
    topk_groups: int | None = None,
    bias: jax.Array | None = None,
    renormalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Picks each token's top-k experts.

    Args:
      logits: f[T, E] router logits.
      top_k: k, experts per token, 1 <= k <= E.
      score: "softmax" or "sigmoid".
      num_groups, topk_groups: group-limited routing (DeepSeek-V3): experts are split into
        `num_groups` equal groups and each token chooses among the experts of its `topk_groups`
        best groups only. Both or neither.
      bias: optional f32[E] added to the scores for *selection only*; the weights are the unbiased
        scores (aux-loss-free balancing).
      renormalize: divide each token's k weights by their sum.

    Returns:
      weights: f32[T, k], the scores of the chosen experts (renormalized if asked), in the order of
        `expert_ids`.
      expert_ids: i32[T, k], distinct expert indices in [0, E), best first.
    """
    _checks.rank(logits, 2, "logits")
    _checks.floating(logits, "logits")
    num_experts = logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    if (num_groups is None) != (topk_groups is None):
        raise ValueError("num_groups and topk_groups must be given together")
    if num_groups is not None:
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups={num_groups} must be >= 1 and divide E={num_experts}")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups={topk_groups} must be in [1, num_groups={num_groups}]")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_groups * (num_experts // num_groups)} experts "
                f"of topk_groups={topk_groups} groups")
    if bias is not None:
        _checks.shape(bias, (num_experts,), "bias")
        _checks.floating(bias, "bias")

    if score == "softmax" and renormalize and bias is None and num_groups is None:
        # Softmax is monotone, and its renormalized top-k is the softmax of the top-k logits:
        # the same choice and weights without exponentiating all E logits.
        top_logits, expert_ids = best_k(logits.astype(jnp.float32), top_k)
        return jax.nn.softmax(top_logits, axis=-1), expert_ids
    scores = router_scores(logits, score)
    choice = selection_scores(scores, num_groups=num_groups, topk_groups=topk_groups, bias=bias)
    _, expert_ids = best_k(choice, top_k)
    return weights_of(scores, expert_ids, renormalize=renormalize), expert_ids


def weights_of(scores: jax.Array, expert_ids: jax.Array, *, renormalize: bool) -> jax.Array:
    """f32[T, k]: the scores of the experts in `expert_ids` (0 for an empty slot, id < 0),
    divided by their sum over each token's slots if `renormalize`."""
    valid = expert_ids >= 0
    weights = jnp.where(valid, jnp.take_along_axis(scores, jnp.maximum(expert_ids, 0), axis=1), 0)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights


def expert_counts(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """i32[E]: (token, slot) pairs routed to each expert; ids outside [0, E) are not counted."""
    ids = expert_ids.reshape(-1)
    ids = jnp.where(ids < 0, num_experts, ids)  # a negative index would wrap around
    return jnp.zeros((num_experts,), jnp.int32).at[ids].add(1, mode="drop")


def _total(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def load_balancing_loss(scores: jax.Array, expert_ids: jax.Array, *, axis_name=None) -> jax.Array:
    """Switch-Transformer balancing loss `E * sum_e f_e * P_e`, f32 scalar.

    f_e is the fraction of (token, slot) pairs routed to expert e and P_e the mean router score of
    e; both are taken over all tokens of `axis_name` (a mesh axis or tuple of axes, inside
    `shard_map`) when given. Equals 1 under perfectly uniform routing. Gradients flow through
    the scores only.

    Args:
      scores: f32[T, E] router scores (`router_scores`).
      expert_ids: i32[T, k] the chosen experts.
    """
    _checks.rank(scores, 2, "scores")
    _checks.rank(expert_ids, 2, "expert_ids")
    num_tokens, num_experts = scores.shape
    top_k = expert_ids.shape[1]
    counts = _total(expert_counts(expert_ids, num_experts), axis_name)
    score_sum = _total(scores.sum(0), axis_name)
    total_tokens = _total(jnp.float32(num_tokens), axis_name)
    fraction = counts.astype(jnp.float32) / (total_tokens * top_k)
    mean_score = score_sum / total_tokens
    return num_experts * jnp.sum(fraction * mean_score)


def router_z_loss(logits: jax.Array, *, axis_name=None) -> jax.Array:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, f32 scalar."""
    _checks.rank(logits, 2, "logits")
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return _total(jnp.sum(z * z), axis_name) / _total(jnp.float32(logits.shape[0]), axis_name)
