"""Load balance: statistics, the sequence-wise balancing loss, the aux-loss-free bias, and what
happens to the pairs an expert's capacity cannot take.

Shapes: T tokens on this rank, k = top_k, E experts, n = size of the EP axis. A *pair* is
(token, slot): slot j of token t, routed to expert_ids[t, j]; ids outside [0, E) are empty slots.

Capacity policies (`OVERFLOW`), for a capacity of c rows per expert and EP group:
- "position": the first c pairs by position (source rank, then token, then slot) are kept, the
  rest dropped (GShard; what `jep.dispatch` does by itself);
- "probability": the c pairs of highest router weight are kept (ties by position);
- "reroute": a pair whose expert is full moves to its token's next-best expert (by the
  selection scores) that it does not use yet, in rounds, until every pair has a place or has
  tried every expert. Pairs placed in a round are never displaced, so a pair is dropped only
  when every expert its token does not already use is full: nothing is dropped when
  pairs <= (E - k + 1) * c over the EP group.

Nothing here builds a [T, E, capacity] tensor; the policies work on the EP group's pairs
(n * T * k of them) and per-expert counts (E).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jep import _checks
from jep.config import OVERFLOW  # noqa: F401 - the policies' names, documented above
from jep.routing import expert_counts


# --- statistics --------------------------------------------------------------------------------

def imbalance(load: jax.Array) -> jax.Array:
    """f32[]: max over mean of `load` (1 is perfect balance; 0 when nothing is loaded)."""
    load = load.astype(jnp.float32)
    mean = jnp.mean(load)
    return jnp.where(mean > 0, jnp.max(load) / jnp.where(mean > 0, mean, 1.0), 0.0)


def rank_loads(tokens_per_expert: jax.Array, num_ranks: int) -> jax.Array:
    """i32[n]: pairs each EP rank receives when experts are split evenly in order over n ranks."""
    return tokens_per_expert.reshape(num_ranks, -1).sum(-1)


def sequence_load_balancing_loss(scores: jax.Array, expert_ids: jax.Array, *,
                                 sequence_length: int, num_sequences: int, first_token=0,
                                 axis_name=None) -> jax.Array:
    """The Switch balancing loss taken per sequence and averaged over sequences, f32 scalar
    (DeepSeek-V3's sequence-wise balance loss, up to its constant).

    Sequence s is the tokens [s * sequence_length, (s + 1) * sequence_length) of the global
    token order; this rank's tokens start at `first_token`. Per-sequence sums are added up
    over `axis_name` (inside `shard_map`), so a sequence may span ranks. Memory: [sequences, E].

    Args:
      scores: f32[T, E] router scores; expert_ids: i32[T, k].
      sequence_length: tokens per sequence; num_sequences: sequences over all ranks.
      first_token: global index of this rank's first token (an int or i32[]).
    """
    _checks.rank(scores, 2, "scores")
    _checks.rank(expert_ids, 2, "expert_ids")
    num_tokens, num_experts = scores.shape
    top_k = expert_ids.shape[1]
    sequence = (first_token + jnp.arange(num_tokens)) // sequence_length  # [T]
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    counts = jnp.zeros((num_sequences, num_experts), jnp.float32).at[
        jnp.broadcast_to(sequence[:, None], expert_ids.shape),
        jnp.where(valid, expert_ids, num_experts)].add(1.0, mode="drop")
    score_sums = jax.ops.segment_sum(scores.astype(jnp.float32), sequence,
                                     num_segments=num_sequences)
    if axis_name is not None:
        counts, score_sums = lax.psum((counts, score_sums), axis_name)
    fraction = counts / (sequence_length * top_k)
    mean_score = score_sums / sequence_length
    return num_experts * jnp.mean(jnp.sum(fraction * mean_score, axis=-1))


# --- aux-loss-free balancing ---------------------------------------------------------------------

def update_bias(bias: jax.Array, tokens_per_expert: jax.Array, *, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free rule: f32[E] bias after one step.

    Each expert's selection bias moves by `rate` toward balance: down when the expert took more
    than the mean number of pairs, up when fewer, unchanged at the mean. Pure; call it in the
    training step on the layer's `aux["tokens_per_expert"]`, and pass the bias back to
    `jep.route` / `jep.moe` (params["bias"]), which use it for selection only.
    """
    _checks.rank(bias, 1, "bias")
    _checks.floating(bias, "bias")
    _checks.shape(tokens_per_expert, bias.shape, "tokens_per_expert")
    if not rate >= 0:
        raise ValueError(f"rate must be >= 0, got {rate!r}")
    load = tokens_per_expert.astype(jnp.float32)
    return bias + (rate * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


# --- capacity policies -------------------------------------------------------------------------

def _ranks_within_expert(experts, priority, num_experts: int):
    """i32[P]: each pair's place among the pairs to the same expert, by priority (lowest first,
    ties by index). Pairs with expert == num_experts (none) get places too, never used."""
    count = experts.shape[0]
    index = jnp.arange(count, dtype=jnp.int32)
    sorted_experts, _, order = lax.sort((experts, priority, index), num_keys=3)
    first = jnp.searchsorted(sorted_experts, sorted_experts, side="left").astype(jnp.int32)
    return jnp.zeros((count,), jnp.int32).at[order].set(index - first)


def _group_pairs(values, axis_name):
    """[T, k] on each rank -> [n * T * k] for the whole EP group, rank-major."""
    return lax.all_gather(values.reshape(-1), axis_name, tiled=True)


def _mine(values, axis_name, count: int):
    """This rank's `count` entries of an EP-group vector made by `_group_pairs`."""
    return lax.dynamic_slice_in_dim(values, lax.axis_index(axis_name) * count, count)


def keep_by_probability(expert_ids, weights, *, capacity: int, num_experts: int, axis_name):
    """(expert_ids with -1 for dropped pairs, num_dropped i32[] of this rank): each expert keeps
    the `capacity` pairs of highest weight over the EP group (ties by position). Inside
    `shard_map` over `axis_name`."""
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    experts = _group_pairs(jnp.where(valid, expert_ids, num_experts), axis_name)
    priority = _group_pairs(-weights.astype(jnp.float32), axis_name)
    place = _mine(_ranks_within_expert(experts, priority, num_experts), axis_name,
                  expert_ids.size).reshape(expert_ids.shape)
    keep = valid & (place < capacity)
    return jnp.where(keep, expert_ids, -1), jnp.sum(valid & ~keep, dtype=jnp.int32)


def reroute(expert_ids, choice, *, capacity: int, num_experts: int, axis_name):
    """Places every pair within `capacity` rows per expert over the EP group, moving those whose
    expert is full to their token's next-best experts (see the module docstring).

    Args:
      expert_ids: i32[T, k], the routed experts (`jep.route`), distinct per token.
      choice: f32[T, E], the selection scores that ranked them (scores plus bias); a pair's next
        candidates are its token's other experts in this order.
      capacity: rows per expert.

    Returns:
      expert_ids: i32[T, k], where each pair ends up (-1: dropped).
      num_rerouted, num_dropped: i32[], pairs of this rank moved / dropped.
    """
    num_tokens, top_k = expert_ids.shape
    # Every expert in the token's order of preference; the first k are its routed experts.
    _, preference = lax.top_k(lax.stop_gradient(choice), num_experts)
    num_pairs = lax.axis_size(axis_name) * num_tokens * top_k
    position = jnp.arange(num_pairs, dtype=jnp.int32)  # EP-group pairs are rank-major
    valid = (expert_ids >= 0) & (expert_ids < num_experts)

    def round_(state):
        ids, pending, next_choice, taken, _ = state
        arriving = _group_pairs(jnp.where(pending, ids, num_experts), axis_name)
        place = _ranks_within_expert(arriving, position, num_experts)
        room = jnp.concatenate([capacity - taken, jnp.zeros((1,), jnp.int32)])
        fits = place < room[arriving]  # [n * T * k]; never for no expert
        taken = taken + expert_counts(jnp.where(fits, arriving, num_experts), num_experts)
        full = pending & ~_mine(fits, axis_name, ids.size).reshape(ids.shape)
        # A token's pairs that found their expert full take its next candidates, in slot order.
        candidate = next_choice[:, None] + jnp.cumsum(full, axis=1, dtype=jnp.int32) - 1
        moved = jnp.take_along_axis(preference, jnp.minimum(candidate, num_experts - 1), axis=1)
        ids = jnp.where(full, jnp.where(candidate < num_experts, moved, -1), ids)
        pending = full & (candidate < num_experts)
        next_choice = next_choice + jnp.sum(full, axis=1, dtype=jnp.int32)
        return ids, pending, next_choice, taken, lax.psum(jnp.sum(pending), axis_name)

    # The first round outside the loop: its results carry the mesh-axis types the loop keeps.
    state = round_((expert_ids, valid, jnp.full((num_tokens,), top_k, jnp.int32),
                    jnp.zeros((num_experts,), jnp.int32), None))
    ids = lax.while_loop(lambda s: s[4] > 0, round_, state)[0]
    num_rerouted = jnp.sum(valid & (ids != expert_ids) & (ids >= 0), dtype=jnp.int32)
    num_dropped = jnp.sum(valid & (ids < 0), dtype=jnp.int32)
    return ids, num_rerouted, num_dropped
