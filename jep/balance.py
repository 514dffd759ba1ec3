"""Load balance: statistics, the sequence-wise balancing loss, the aux-loss-free bias, and what
happens to the pairs an expert's capacity cannot take.

Shapes: T tokens on this rank, k = top_k, E experts, n = size of the EP axis. A *pair* is
(token, slot): slot j of token t, routed to expert_ids[t, j]; ids outside [0, E) are empty slots.

Capacity policies (`OVERFLOW`), for a capacity of c rows per expert and EP group:
- "position": the first c pairs by position (source rank, then token, then slot) are kept, the
  rest dropped (GShard; what `jep.dispatch` does by itself);
- "probability": the c pairs of highest router weight are kept (ties by position);
- "reroute": a pair whose expert is full moves to its token's next-best expert (by the
  selection scores) that it does not use yet and that has room, in rounds: each round the
  arriving pairs are taken in position order while there is room, and those turned away go on
  to their next open expert. Pairs placed in a round are never displaced, and a full expert
  stays full, so a pair is dropped only when every expert its token does not already use is
  full: nothing is dropped when pairs <= (E - k + 1) * c over the EP group.

Nothing here builds a [T, E, capacity] tensor; the policies work on the EP group's pairs
(n * T * k of them) and per-expert counts (E).
"""

from __future__ import annotations

import functools
import heapq
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jep import _checks
from jep.config import OVERFLOW  # noqa: F401 - the policies' names, documented above
from jep.layout import arrival_places
from jep.routing import best_k


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

def _ranks_within_expert(experts, num_experts: int, priority):
    """i32[P]: each pair's place among the pairs to the same expert, lowest `priority` first
    (ties by index). Pairs with expert == num_experts (none) get places too, never used. (In
    index order alone, without a sort: `jep.layout.arrival_places`.)"""
    count = experts.shape[0]
    index = jnp.arange(count, dtype=jnp.int32)
    sorted_experts, _, order = lax.sort((experts, priority, index), num_keys=3)
    # Where each expert's pairs start in the sorted order.
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[experts].add(1, mode="drop")
    first = (jnp.cumsum(counts) - counts)[sorted_experts]
    return jnp.zeros((count,), jnp.int32).at[order].set(index - first, unique_indices=True)


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
    place = _mine(_ranks_within_expert(experts, num_experts, priority), axis_name,
                  expert_ids.size).reshape(expert_ids.shape)
    keep = valid & (place < capacity)
    return jnp.where(keep, expert_ids, -1), jnp.sum(valid & ~keep, dtype=jnp.int32)


# Below every key `_order_keys` gives: no candidate.
_NONE_LEFT = np.iinfo(np.int32).min


def _order_keys(values):
    """i32 keys in the order of the f32 `values` (larger value, larger key; -inf above
    _NONE_LEFT), so that a sentinel can sit below every score, -inf included."""
    values = values.astype(jnp.float32)
    bits = lax.bitcast_convert_type(jnp.where(values == 0, 0.0, values), jnp.int32)  # -0 is 0
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


# Reroute rounds run back to back in one iteration of its loop.
ROUNDS_PER_ITERATION = 2


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
    # A token's experts in its order of preference are those of larger key first, ties to the
    # lower index (`lax.top_k`'s order); its routed experts are the first k. `mark` is where
    # its pointer stands: the (key, index) of the last expert it has passed, at first its k-th.
    keys = _order_keys(choice)
    expert = jnp.arange(num_experts, dtype=jnp.int32)
    top_keys, top_ids = best_k(keys, top_k)
    valid = (expert_ids >= 0) & (expert_ids < num_experts)

    def round_(state):
        ids, pending, mark_key, mark_id, taken, _ = state
        arriving = _group_pairs(jnp.where(pending, ids, num_experts), axis_name)
        place, arrivals = arrival_places(arriving, num_experts)
        room = jnp.concatenate([capacity - taken, jnp.zeros((1,), jnp.int32)])
        fits = place < room[arriving]  # [n * T * k]; never for no expert
        # Each expert takes as many of its arrivals as it has room for.
        taken = jnp.minimum(taken + arrivals[:num_experts], capacity)
        full = pending & ~_mine(fits, axis_name, ids.size).reshape(ids.shape)
        # The m-th of a token's pairs that found their expert full takes the m-th expert past
        # its pointer, in its order, that has room now (others may take it first; then the
        # pair tries again next round). No candidate left: the pair is dropped.
        past_mark = ((keys < mark_key[:, None])
                     | ((keys == mark_key[:, None]) & (expert > mark_id[:, None])))
        open_keys = jnp.where(past_mark & (taken < capacity), keys, _NONE_LEFT)
        candidate_keys, candidates = best_k(open_keys, top_k)  # [T, k], in the token's order
        nth = jnp.cumsum(full, axis=1, dtype=jnp.int32)  # [T, k], 1-based among the full
        column = jnp.maximum(nth - 1, 0)
        found = jnp.take_along_axis(candidate_keys, column, axis=1) > _NONE_LEFT
        moved = jnp.take_along_axis(candidates, column, axis=1)
        ids = jnp.where(full, jnp.where(found, moved, -1), ids)
        pending = full & found
        # The pointer moves past the last candidate taken (past every expert when that was
        # none: _NONE_LEFT is below every key).
        last = jnp.maximum(nth[:, -1:] - 1, 0)
        moves = nth[:, -1] > 0
        mark_key = jnp.where(moves, jnp.take_along_axis(candidate_keys, last, axis=1)[:, 0],
                             mark_key)
        mark_id = jnp.where(moves, jnp.take_along_axis(candidates, last, axis=1)[:, 0], mark_id)
        return ids, pending, mark_key, mark_id, taken, lax.psum(jnp.sum(pending), axis_name)

    def rounds(state):
        # A round with nothing pending changes nothing, so several rounds an iteration give the
        # same result; they save the device's round trips to the host for the loop's condition.
        for _ in range(ROUNDS_PER_ITERATION):
            state = round_(state)
        return state

    # The first round outside the loop: its results carry the mesh-axis types the loop keeps.
    state = round_((expert_ids, valid, top_keys[:, -1], top_ids[:, -1],
                    jnp.zeros((num_experts,), jnp.int32), None))
    ids = lax.while_loop(lambda s: s[-1] > 0, rounds, state)[0]
    num_rerouted = jnp.sum(valid & (ids != expert_ids) & (ids >= 0), dtype=jnp.int32)
    num_dropped = jnp.sum(valid & (ids < 0), dtype=jnp.int32)
    return ids, num_rerouted, num_dropped


# --- replicated experts (EPLB) ---------------------------------------------------------------

class Placement(NamedTuple):
    """Logical experts on physical slots: P = E + R slots, rank r holding slots
    [r * P / n, (r + 1) * P / n) (as an [P, ...] array sharded over the EP axis).

    A pytree of arrays whose shapes depend only on (E, R): a new placement of the same sizes
    passes through `jax.jit` without recompiling.

    Attributes:
      physical_to_logical: i32[P], the logical expert in each slot.
      logical_to_physical: i32[E, R + 1], each expert's slots, -1 past its count.
      replica_count: i32[E], slots per expert (1 + its redundant replicas).
    """

    physical_to_logical: np.ndarray
    logical_to_physical: np.ndarray
    replica_count: np.ndarray

    @property
    def num_physical(self) -> int:
        return len(self.physical_to_logical)


def identity_placement(num_experts: int) -> Placement:
    """Every expert in its own slot, in order: what no replicas means."""
    slots = np.arange(num_experts, dtype=np.int32)
    return Placement(slots, slots[:, None].copy(), np.ones(num_experts, np.int32))


def check_placement(placement, num_experts: int, num_ranks: int) -> int:
    """Raises a ValueError naming what does not fit; returns R, the redundant replicas."""
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a jep.balance.Placement, got {type(placement)}")
    num_physical = placement.physical_to_logical.shape[0]
    if placement.replica_count.shape != (num_experts,) or placement.logical_to_physical.shape != (
            num_experts, num_physical - num_experts + 1):
        raise ValueError(
            f"placement is for {placement.replica_count.shape[0]} experts and "
            f"{num_physical} slots; the layer has E={num_experts} (logical_to_physical must be "
            f"[E, P - E + 1])")
    if num_physical % num_ranks:
        raise ValueError(f"placement has {num_physical} slots, not divisible by the {num_ranks} "
                         "ranks of the EP axis")
    return num_physical - num_experts


def place_experts(load, *, num_replicas: int, num_ranks: int,
                  num_nodes: int | None = None) -> Placement:
    """Places E logical experts on E + R physical slots over n ranks so that rank loads are even.

    Host-side (numpy), between steps. First the R redundant replicas go, one at a time, to the
    expert with the highest load per copy; each copy then carries load / copies. Then the copies
    are packed heaviest first, each on the rank with the least load that has a free slot and no
    copy of the same expert yet where one exists (longest-processing-time packing). With
    `num_nodes`, copies are first packed that way onto nodes, then within each node onto its
    ranks (traffic stays inside nodes when it can).

    Args:
      load: f[E] per-expert load (token counts), or f[steps, E], a history (summed).
      num_replicas: R >= 0 redundant copies; E + R must be divisible by n.
      num_ranks: n, the size of the EP axis.
      num_nodes: optional number of nodes, dividing n.
    """
    load = np.asarray(load, np.float64)
    if load.ndim == 2:
        load = load.sum(0)
    if load.ndim != 1:
        raise ValueError(f"load must be [E] or [steps, E], got shape {load.shape}")
    num_experts = load.shape[0]
    if num_replicas < 0 or (num_experts + num_replicas) % num_ranks:
        raise ValueError(f"num_replicas={num_replicas} must be >= 0 with E + R = "
                         f"{num_experts + num_replicas} divisible by num_ranks={num_ranks}")
    if num_nodes is not None and (num_nodes < 1 or num_ranks % num_nodes):
        raise ValueError(f"num_nodes={num_nodes} must divide num_ranks={num_ranks}")
    count = np.ones(num_experts, np.int64)
    heap = [(-load[e], e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(num_replicas):
        _, e = heapq.heappop(heap)
        count[e] += 1
        heapq.heappush(heap, (-load[e] / count[e], e))
    copies = [(load[e] / count[e], e) for e in range(num_experts) for _ in range(count[e])]
    copies.sort(key=lambda c: (-c[0], c[1]))
    slots_per_rank = (num_experts + num_replicas) // num_ranks
    if num_nodes is None:
        ranks = _pack(copies, num_ranks, slots_per_rank)
    else:
        per_node = num_ranks // num_nodes
        ranks = [[] for _ in range(num_ranks)]
        for node, members in enumerate(_pack(copies, num_nodes, slots_per_rank * per_node)):
            members.sort(key=lambda c: (-c[0], c[1]))
            for i, held in enumerate(_pack(members, per_node, slots_per_rank)):
                ranks[node * per_node + i] = held
    physical_to_logical = np.array([e for held in ranks for _, e in held], np.int32)
    logical_to_physical = np.full((num_experts, num_replicas + 1), -1, np.int32)
    filled = np.zeros(num_experts, np.int64)
    for slot, e in enumerate(physical_to_logical):
        logical_to_physical[e, filled[e]] = slot
        filled[e] += 1
    return Placement(physical_to_logical, logical_to_physical, count.astype(np.int32))


def _pack(copies, num_bins: int, slots: int):
    """Longest-processing-time packing of (load, expert) copies, heaviest first, into
    `num_bins` bins of `slots` each; a bin that already holds the expert is avoided when
    another with room exists."""
    bins = [[] for _ in range(num_bins)]
    totals = np.zeros(num_bins)
    for weight, e in copies:
        open_bins = [b for b in range(num_bins) if len(bins[b]) < slots]
        fresh = [b for b in open_bins if all(held != e for _, held in bins[b])] or open_bins
        b = min(fresh, key=lambda b: (totals[b], b))
        bins[b].append((weight, e))
        totals[b] += weight
    return bins


def rank_load_of(placement: Placement, load, num_ranks: int) -> np.ndarray:
    """f[n]: the load each rank gets under `placement` when an expert's tokens are spread evenly
    over its copies."""
    load = np.asarray(load, np.float64)
    load = load.sum(0) if load.ndim == 2 else load
    per_copy = load[placement.physical_to_logical] / placement.replica_count[
        placement.physical_to_logical]
    return per_copy.reshape(num_ranks, -1).sum(1)


def replica_ids(expert_ids, placement: Placement, first_pair=0):
    """i32[T, k]: the physical slot each pair goes to, spreading an expert's pairs over its
    copies in turn (by the pair's global position `first_pair + t * k + j`); empty slots stay
    empty (-1)."""
    num_experts = placement.replica_count.shape[0]
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    e = jnp.where(valid, expert_ids, 0)
    position = first_pair + jnp.arange(expert_ids.size, dtype=jnp.int32).reshape(expert_ids.shape)
    copy = position % jnp.asarray(placement.replica_count)[e]
    return jnp.where(valid, jnp.asarray(placement.logical_to_physical)[e, copy], -1)


def sum_replica_gradients(grads, placement: Placement, *, axis_name):
    """Gradients of [P_local, ...] expert slots -> each slot holds the sum over all copies of its
    logical expert (what the logical expert's gradient is; every copy then takes the same step).

    Inside `shard_map` over `axis_name`, each leaf this rank's slots (a block of P / n). Only
    the replicated experts are reduced over the axis: a psum of [R, ...] per leaf.
    """
    num_experts = placement.replica_count.shape[0]
    num_replicas = placement.physical_to_logical.shape[0] - num_experts
    if num_replicas == 0:
        return grads
    count = jnp.asarray(placement.replica_count)
    replicated = count > 1
    # Each replicated expert's row in the [R, ...] buffer (at most R experts have copies).
    row_of = jnp.where(replicated, jnp.cumsum(replicated) - 1, num_replicas)
    rank = lax.axis_index(axis_name)

    def one(g):
        local = g.shape[0]
        logical = lax.dynamic_slice_in_dim(jnp.asarray(placement.physical_to_logical),
                                           rank * local, local)
        rows = row_of[logical]
        total = jnp.zeros((num_replicas,) + g.shape[1:], g.dtype).at[rows].add(g, mode="drop")
        total = lax.psum(total, axis_name)
        summed = jnp.take(total, jnp.minimum(rows, num_replicas - 1), axis=0)
        keep = (rows >= num_replicas).reshape((local,) + (1,) * (g.ndim - 1))
        return jnp.where(keep, g, summed)

    return jax.tree.map(one, grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tie_copies(weights, placement: Placement, axis_name):
    """The identity on [P_local, ...] expert-slot weights (inside `shard_map` over `axis_name`)
    whose gradient is `sum_replica_gradients` of the slots' own: every copy of an expert gets
    its logical expert's gradient, so copies that start equal stay equal under any optimizer."""
    return weights


def _tie_fwd(weights, placement, axis_name):
    return weights, placement


def _tie_bwd(axis_name, placement, grad):
    return sum_replica_gradients(grad, placement, axis_name=axis_name), None


tie_copies.defvjp(_tie_fwd, _tie_bwd)


def move_experts(tree, old: Placement, new: Placement):
    """Expert-slot arrays ([P, ...] leaves: weights, optimizer moments) laid out for `new`:
    each new slot takes the values of a slot of its logical expert under `old`. Call between
    steps (jitted, the leaves sharded over the EP axis); copies of one expert hold the same
    values when their gradients were summed (`sum_replica_gradients`)."""
    source = jnp.asarray(old.logical_to_physical)[jnp.asarray(new.physical_to_logical), 0]
    return jax.tree.map(lambda leaf: jnp.take(leaf, source, axis=0), tree)
