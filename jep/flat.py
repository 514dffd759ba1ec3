"""Dispatch and combine in one level (flat mode): ragged token exchange over the EP axis, under
`shard_map`. `jep.dispatch` and `jep.combine` (jep/dispatch.py) are the public calls; the
hierarchical mode (jep/hierarchical.py) is two of these, one per axis.

Shapes (per rank): T tokens, H hidden, k = top_k, E experts, n = EP size, E_local = E / n,
S = T * min(k, n) send rows, R = n * T receive rows (the most n peers can send), C expanded rows:
`n * T * min(k, E_local)` dropless, `E_local * capacity` otherwise.

The path of a token:
  home rank:   x[T, H] --gather by send order--> send rows [S, H]   (one row per (rank, token))
  the wire:    transport exchange                -> received rows [R, H] (by source rank, token)
  expert rank: expand each received row to its local experts -> recv_x[C, H], grouped by expert
               (a transport with EXPANDS, `ffi`, writes the received rows there on arrival)
and combine walks it back: each expert rank first adds up a token's local expert outputs with
their weights (one row per (token, rank)), sends that row home, where the rows are added.

`dispatch` and `combine` are each other's transpose: the backward of dispatch is an unweighted
combine, the backward of combine is a dispatch scaled by the weights, plus the weights' gradient.
Sums are taken in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from jep import _checks, transport
from jep.fp8 import pack_rows, unpack_rows
from jep.layout import (arrival_places, exclusive_cumsum, get_dispatch_layout, max_send_rows,
                        sum_rows, take_rows, take_rows_dots, take_rows_scaled)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["send_token", "send_sizes", "recv_sizes", "slot_send_row", "slot_is_first",
                 "recv_pair", "pair_row", "pair_first", "group_sizes", "num_dropped",
                 "num_invalid_ids"],
    meta_fields=["axis_name", "num_experts", "capacity", "backend", "permute", "timeout_s"],
)
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What `combine` and the gradients need to walk a dispatch back. A pytree.

    A *pair* is (received row i, slot j): slot j of the token carried by received row i.
    Home side (the rank that owns the tokens):
      send_token: i32[S], token of each send row (T past the last).
      send_sizes: i32[n], rows sent to each rank; recv_sizes: i32[n], rows received from each.
      slot_send_row: i32[T, k], the send row of slot j of token t (S for an empty slot).
      slot_is_first: bool[T, k], slot j is the first of token t's slots on its rank.
    Expert side (the rank that holds the experts):
      recv_pair: i32[C], the pair `i * k + j` behind each expanded row (R * k for none).
      pair_row: i32[R, k], the expanded row of each pair (C for a pair not here, or dropped, or
        a repeat of an earlier slot's expert).
      pair_first: i32[R, k], the first slot of row i with slot j's expert (j itself but for a
        token that named one expert in several slots: those share the first slot's row, and
        their weights add up).
      group_sizes: i32[E_local], rows of each local expert in recv_x.
      num_dropped: i32[], pairs received here that did not fit the capacity (0 when dropless).
      num_invalid_ids: i32[], this rank's slots whose expert id is >= E (a caller's bug: sent
        nowhere, counted here; `jax.experimental.checkify` turns it into an error).
    backend is the transport, permute the row mover of the expansion and the sums
    (`jep.layout.take_rows`), timeout_s how long the `ffi` transport waits for peers (None: its
    default).
    """

    send_token: jax.Array
    send_sizes: jax.Array
    recv_sizes: jax.Array
    slot_send_row: jax.Array
    slot_is_first: jax.Array
    recv_pair: jax.Array
    pair_row: jax.Array
    pair_first: jax.Array
    group_sizes: jax.Array
    num_dropped: jax.Array
    num_invalid_ids: jax.Array
    axis_name: object
    num_experts: int
    capacity: int | None
    backend: str
    permute: str
    timeout_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.slot_send_row.shape[0]

    @property
    def top_k(self) -> int:
        return self.slot_send_row.shape[1]

    @property
    def num_ranks(self) -> int:
        return self.send_sizes.shape[0]


def ep_size(axis_name, caller: str) -> int:
    """The size of `axis_name`, with a clear error when not inside `shard_map` over it."""
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{caller} must be called inside jax.shard_map over the mesh axis "
            f"axis_name={axis_name!r}, which is not bound here") from None


def check_dispatch_inputs(x, expert_ids, *, num_experts, capacity, axis_name, caller: str) -> int:
    """The trace-time checks of a dispatch's arguments (x f[T, H], expert_ids i[T, k], E
    divisible by the size n of `axis_name`, capacity None or >= 0); returns n."""
    _checks.rank(x, 2, "x")
    _checks.floating(x, "x")
    _checks.rank(expert_ids, 2, "expert_ids")
    _checks.integer(expert_ids, "expert_ids")
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_ids must have one row per token of x: x has {x.shape[0]} tokens, "
            f"expert_ids has shape {expert_ids.shape}")
    if expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids must have at least one slot, got shape {expert_ids.shape}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")
    num_ranks = ep_size(axis_name, caller)
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the size {num_ranks} of "
            f"axis_name={axis_name!r}")
    return num_ranks


# --- the four moves, shared by dispatch, combine and their gradients ------------------------
# Under name scopes that a profile of a step tells apart (`jep.bench.profile.KINDS`): the
# planning is "jep_layout", every move of rows "jep_permute", and inside it each transport
# exchange "jep_exchange" (`jep.transport`).
permute_scope = jax.named_scope("jep_permute")


def op_id(site, offset: int):
    """The op id of the `offset`-th exchange of a call whose ids start at `site` (an i32 scalar,
    `jep_kernels.ragged_a2a.new_op_ids`), or None (each exchange draws its own when traced)."""
    return None if site is None else site + offset


def _exchange(rows, send_sizes, recv_sizes, out_rows, *, backend, axis_name, num_tokens,
              timeout_s, op=None):
    # A rank sends at most one row per token to a peer, so T bounds every peer's slice.
    return transport.exchange(backend, rows, send_sizes, recv_sizes, axis_name=axis_name,
                              out_rows=out_rows, max_rows_per_peer=num_tokens,
                              timeout_s=timeout_s, op=op)


@permute_scope
def _to_experts(h: DispatchHandle, home, permute=None, expand=False, op=None):
    """[T, *F] on the home rank -> [R, *F] received rows on the expert ranks (gathered into send
    order by `permute`, the handle's by default), or with `expand` [C, *F] rows grouped by local
    expert (each received row copied to its pairs' rows: `recv_x`)."""
    expansion = (h.pair_row, _source_rows(h)) if expand else None
    return transport.exchange(
        h.backend, home, h.send_sizes, h.recv_sizes, axis_name=h.axis_name,
        out_rows=h.num_ranks * h.num_tokens, max_rows_per_peer=h.num_tokens, index=h.send_token,
        expansion=expansion, permute=permute or h.permute, timeout_s=h.timeout_s, op=op)


@permute_scope
def _to_home(h: DispatchHandle, received, op=None):
    """[R, *F] rows on the expert ranks -> [S, *F] in the home rank's send order."""
    num_rows = max_send_rows(h.num_tokens, h.top_k, h.num_ranks)
    return _exchange(received, h.recv_sizes, h.send_sizes, num_rows,
                     backend=h.backend, axis_name=h.axis_name, num_tokens=h.num_tokens,
                     timeout_s=h.timeout_s, op=op)


@permute_scope
def _sum_home(h: DispatchHandle, received, op=None):
    """[R, H] rows on the expert ranks -> [T, H] at home: each token's rows (one per rank it
    reached) sent back and added in float32, in received's dtype."""
    return transport.exchange_sum(
        h.backend, received, h.recv_sizes, h.send_sizes, h.slot_send_row, h.slot_is_first,
        axis_name=h.axis_name, out_rows=max_send_rows(h.num_tokens, h.top_k, h.num_ranks),
        max_rows_per_peer=h.num_tokens, permute=h.permute, timeout_s=h.timeout_s, op=op)


def _source_rows(h: DispatchHandle):
    """i32[C]: the received row each row of recv_x copies (out of range past the last)."""
    return h.recv_pair // h.top_k


@permute_scope
def _expand(h: DispatchHandle, received):
    """[R, H] received rows -> [C, H] rows grouped by local expert (zeros past the last)."""
    return take_rows(received, _source_rows(h), h.permute)


@permute_scope
def _reduce_pairs(h: DispatchHandle, expanded, pair_weights=None):
    """[C, H] expert rows -> [R, H] in their dtype: each received row's pairs summed in float32
    (weighted if given)."""
    return sum_rows(expanded, h.pair_row, pair_weights, h.permute)


# --- repeated ids within a row -------------------------------------------------------------

def first_slots(ids):
    """i32[N, k]: for each slot j of row i, the first slot of row i holding the same value as
    slot j (j itself, unless an earlier slot repeats it)."""
    return jnp.argmax(ids[:, :, None] == ids[:, None, :], axis=2).astype(jnp.int32)


def add_to_first_slots(values, first):
    """[N, k]: each slot's value added into slot first[i, j] of its row (`first_slots`), zero in
    the slots that repeat an earlier one."""
    rows = jnp.arange(values.shape[0], dtype=jnp.int32)[:, None]
    return jnp.zeros_like(values).at[rows, first].add(values)


# --- planning ------------------------------------------------------------------------------

@jax.named_scope("jep_layout")
def _plan(expert_ids, *, num_experts, axis_name, capacity, backend, permute,
          timeout_s=None, op=None) -> DispatchHandle:
    num_ranks = ep_size(axis_name, "jep.dispatch")
    num_tokens, top_k = expert_ids.shape
    experts_per_rank = num_experts // num_ranks
    layout = get_dispatch_layout(expert_ids, num_experts=num_experts, num_ranks=num_ranks)
    send_sizes = layout.tokens_per_rank
    recv_sizes = send_sizes
    if num_ranks > 1:
        recv_sizes = lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True)

    # Each send row carries its token's slots as local expert ids of the destination, +1 so that
    # the zeros past the last received row read as "no expert".
    slot_ids = jnp.take(expert_ids.astype(jnp.int32), layout.send_token, axis=0, mode="fill",
                        fill_value=-1)  # [S, k]
    local = slot_ids - layout.send_rank[:, None] * experts_per_rank
    local = jnp.where((local >= 0) & (local < experts_per_rank) & (slot_ids >= 0), local + 1, 0)
    pair_expert = _exchange(local, send_sizes, recv_sizes, num_ranks * num_tokens,
                            backend=backend, axis_name=axis_name, num_tokens=num_tokens,
                            timeout_s=timeout_s, op=op) - 1
    # A token naming one expert in several slots gets one row there, shared by those slots
    # (their weights add up in combine): so no token takes more than min(k, E_local) rows.
    pair_first = first_slots(pair_expert)
    pair_expert = jnp.where(pair_first == jnp.arange(top_k), pair_expert, -1)

    # Rows grouped by local expert, within an expert by source rank, then source token: a
    # pair's row is its expert's first row plus its place among the expert's pairs (counted
    # without a sort: `arrival_places`). With a capacity, an expert keeps its first `capacity`.
    pair_expert = jnp.where(pair_expert >= 0, pair_expert, experts_per_rank).reshape(-1)
    num_pairs = pair_expert.shape[0]
    place, counts = arrival_places(pair_expert, experts_per_rank)
    counts = counts[:experts_per_rank]
    if capacity is None:
        num_rows = num_ranks * num_tokens * min(top_k, experts_per_rank)
        group_sizes = counts
    else:
        num_rows = experts_per_rank * capacity
        group_sizes = jnp.minimum(counts, capacity)
    expert = jnp.minimum(pair_expert, experts_per_rank - 1)
    kept = (pair_expert < experts_per_rank) & (place < group_sizes[expert])
    pair_row = jnp.where(kept, exclusive_cumsum(group_sizes)[expert] + place, num_rows)
    # i32[C]: the pair each row holds; num_pairs past the last kept row.
    recv_pair = jnp.full((num_rows,), num_pairs, jnp.int32).at[pair_row].set(
        jnp.arange(num_pairs, dtype=jnp.int32), mode="drop")
    return DispatchHandle(
        send_token=layout.send_token, send_sizes=send_sizes, recv_sizes=recv_sizes,
        slot_send_row=layout.slot_send_row, slot_is_first=layout.slot_is_first,
        recv_pair=recv_pair, pair_row=pair_row.reshape(-1, top_k), pair_first=pair_first,
        group_sizes=group_sizes, num_dropped=(counts - group_sizes).sum(),
        num_invalid_ids=jnp.sum(expert_ids >= num_experts, dtype=jnp.int32),
        axis_name=axis_name, num_experts=num_experts,
        capacity=capacity, backend=backend, permute=permute, timeout_s=timeout_s)


# --- the differentiable row movers ---------------------------------------------------------

# The row movers' exchanges take op ids site + 0, 1, ... (`op_id`), in the order of the
# comments beside them.
@jax.custom_vjp
def _dispatch_rows(x, h, site=None):
    return _to_experts(h, x, expand=True, op=op_id(site, 0))  # 0


def _dispatch_rows_fwd(x, h, site=None):
    return _dispatch_rows(x, h, site), (h, site)


@permute_scope
def _dispatch_rows_bwd(residuals, g):
    # The transpose: an unweighted combine.
    h, site = residuals
    return _sum_home(h, _reduce_pairs(h, g), op=op_id(site, 1)), None, None  # 1


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)
DISPATCH_ROWS_OPS = 2


@jax.custom_vjp
def _dispatch_fp8_rows(x, h, site=None):
    """`_dispatch_rows` with each token travelling as e4m3 with its scales, one packed row of
    integer words (`jep.fp8.pack_rows`: XLA's gathers move them), dequantized to x.dtype on
    arrival, before the expansion: each received row once (R of them, not the C expanded), and
    the expansion moves floating rows (the handle's permute). Its transpose is
    `_dispatch_rows`': a combine in the cotangent's dtype, straight through the
    quantization."""
    moved = _to_experts(h, pack_rows(x), permute="xla", op=op_id(site, 0))  # 0
    return _expand(h, unpack_rows(moved, x.shape[1], x.dtype))


def _dispatch_fp8_rows_fwd(x, h, site=None):
    return _dispatch_fp8_rows(x, h, site), (h, site)


_dispatch_fp8_rows.defvjp(_dispatch_fp8_rows_fwd, _dispatch_rows_bwd)


@permute_scope
def _combine(y, weights, h, site):
    # f32[R, k]: k floats a row, a repeated expert's weights added up in its first slot.
    pair_weights = add_to_first_slots(
        _to_experts(h, weights.astype(jnp.float32), "xla", op=op_id(site, 0)),  # 0
        h.pair_first)
    partial_sums = _reduce_pairs(h, y, pair_weights)
    return _sum_home(h, partial_sums, op=op_id(site, 1)), pair_weights  # 1


@jax.custom_vjp
def _combine_rows(y, weights, h, site=None):
    return _combine(y, weights, h, site)[0]


def _combine_rows_fwd(y, weights, h, site=None):
    out, pair_weights = _combine(y, weights, h, site)
    return out, (y, weights, pair_weights, h, site)


@permute_scope
def _combine_rows_bwd(residuals, g):
    y, weights, pair_weights, h, site = residuals
    g_received = _to_experts(h, g, op=op_id(site, 2))  # 2: [R, H]
    # dy: the output gradient dispatched, scaled by each pair's weight. XLA's gather, which
    # fuses with the scaling into one pass over the rows (the Pallas gather and then the
    # scaling are two: 0.34 against 0.52 ms at 32768 x 7168 bf16 rows on an H200).
    row_weight = take_rows(pair_weights.reshape(-1), h.recv_pair)
    dy = take_rows_scaled(g_received, _source_rows(h), row_weight)
    # dweights[t, j] = <g[t], y[row of (t, j)]>, taken on the expert rank, sent home per slot
    # (a repeated expert's slots all read its one row).
    slot_row = jnp.take_along_axis(h.pair_row, h.pair_first, axis=1)
    dots = take_rows_dots(y, slot_row, g_received)  # f32[R, k]
    dots_home = _to_home(h, dots, op=op_id(site, 3))  # 3: [S, k]
    flat = h.slot_send_row * h.top_k + jnp.arange(h.top_k, dtype=jnp.int32)[None, :]
    dweights = take_rows(dots_home.reshape(-1), flat)
    return dy, dweights.astype(weights.dtype), None, None


_combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)
COMBINE_OPS = 4


# --- one level: dispatch and combine over one EP axis (or a tuple of axes as one) ----------

def merge_repeated_experts(expert_ids, weights):
    """(expert_ids, weights) [T, k] with an expert named in several slots of a token kept in the
    first of them, with the sum of their weights; the others become empty slots (-1)."""
    first = first_slots(expert_ids)
    return (jnp.where(first == jnp.arange(expert_ids.shape[1]), expert_ids, -1),
            add_to_first_slots(weights, first))


def check_ids(check: bool, expert_ids, num_experts: int) -> None:
    """With `check`, an error under `jax.experimental.checkify.checkify` where some of a rank's
    `expert_ids` reach past E; nothing otherwise (the handles count them, `num_invalid_ids`).

    Off by default in every caller: the check puts an effect in the program, and jax then runs
    every call of a jitted function that holds it through its Python dispatch path instead of
    the C++ one (on an H200 host about 1 ms more host time a call of a Qwen3-30B-A3B layer
    step, under the profiler)."""
    if not isinstance(check, bool):
        raise TypeError(f"check_ids must be a bool, got {check!r}")
    if not check:
        return
    num_invalid_ids = jnp.sum(expert_ids >= num_experts, dtype=jnp.int32)
    checkify.debug_check(num_invalid_ids == 0,
                         "jep.dispatch: {n} expert ids >= num_experts=" + str(num_experts),
                         n=num_invalid_ids)


def dispatch(x, expert_ids, *, num_experts: int, axis_name, capacity: int | None = None,
             backend: str = "auto", permute: str = "auto", timeout_s: float | None = None,
             fp8: bool = False, site=None):
    """`jep.dispatch` in flat mode: one exchange over `axis_name`; the same arguments and
    results (the handle a `DispatchHandle`). The arguments are the caller's to check
    (`jep.dispatch` does, with `check_dispatch_inputs`, before either mode). `site`: the first
    of the DISPATCH_OPS op ids its exchanges take (`op_id`), or None."""
    handle = plan(expert_ids, num_experts=num_experts, axis_name=axis_name, capacity=capacity,
                  backend=backend, permute=permute, timeout_s=timeout_s, site=site)  # 0
    rows = (_dispatch_fp8_rows if fp8 else _dispatch_rows)(x, handle, op_id(site, 1))  # 1, 2
    return rows, handle.group_sizes, handle


def plan(expert_ids, *, num_experts: int, axis_name, capacity: int | None = None,
         backend: str = "auto", permute: str = "auto", timeout_s: float | None = None,
         site=None) -> DispatchHandle:
    """The `DispatchHandle` of a flat `dispatch` (its first exchange, op id `site` + 0), without
    moving any token: for a caller that moves its own rows with it (hierarchical FP8)."""
    backend = transport.resolve(backend, axis_name=axis_name)
    handle = _plan(expert_ids, num_experts=num_experts, axis_name=axis_name, capacity=capacity,
                   backend=backend, permute=permute, timeout_s=timeout_s, op=op_id(site, 0))
    return handle


DISPATCH_OPS = 1 + DISPATCH_ROWS_OPS


def combine(y, handle: DispatchHandle, weights, site=None):
    """`jep.combine` for a `DispatchHandle`: [T, H] in y.dtype. `site`: the first of the
    COMBINE_OPS op ids its exchanges take, or None."""
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle returned by jep.dispatch, got {type(handle)}")
    _checks.rank(y, 2, "y")
    _checks.floating(y, "y")
    _checks.floating(weights, "weights")
    if y.shape[0] != handle.recv_pair.shape[0]:
        raise ValueError(
            f"y must have one row per row of recv_x ({handle.recv_pair.shape[0]}), got shape {y.shape}")
    _checks.shape(weights, (handle.num_tokens, handle.top_k), "weights")
    ep_size(handle.axis_name, "jep.combine")
    return _combine_rows(y, weights, handle, site)
