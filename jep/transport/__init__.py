"""Transports: how token rows cross the EP axis. One module per backend, one registry.

A transport is one function, `exchange`, called inside `shard_map` over `axis_name`:

    exchange(rows, send_sizes, recv_sizes, *, axis_name, out_rows, max_rows_per_peer) -> out

  rows:        [N, *F], the rows for peer p at `exclusive_cumsum(send_sizes)[p]`, peer 0 first.
  send_sizes:  i32[n], rows this rank sends to each peer.
  recv_sizes:  i32[n], rows this rank receives from each peer (what the peers' send_sizes say).
  out:         [out_rows, *F], the rows from peer p at `exclusive_cumsum(recv_sizes)[p]`, in the
               order peer p sent them; rows past `sum(recv_sizes)` are zero.
  max_rows_per_peer: a static bound on every send and receive size (the dense emulation's block).

It moves bytes only: `dispatch` and `combine` own the layout, the expansion and the gradients, so a
new transport is one module here plus one line in `_BACKENDS`.

`dispatch` and `combine` call the two moves below, which a transport may fuse: `exchange` with an
`index` (send `rows[index]`, gathered on the way out) and an `expansion` (each received row
written to its expert rows on arrival), and `exchange_sum` (the way home of combine, where each
token's received rows are added). A module that defines `GATHERS = True` takes `index=` in its
`exchange`, one with `EXPANDS = True` takes `expand=` and `expanded_rows=`, one that defines
`exchange_sum` fuses the sum; for the others they are composed here from plain JAX and their
`exchange`. A module that defines `TIMES_OUT = True` (it waits for its peers and gives up)
takes `timeout_s=` (seconds, None: its default); one that defines `TAKES_OP = True` (its calls
on the devices meet by an id) takes `op=`, the exchange's id (an i32 scalar, or None: drawn
when traced; `jep_kernels.ragged_a2a`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jep.layout import sum_rows, take_rows
from jep.platform import current_platform
from jep.transport import ffi, reference, xla

# Preferred first: `auto` takes the first one that runs on the platform. On the CPU, where `xla`
# does not run, that is `ffi`. On GPUs `ffi` was measured faster than `xla` across 2 H200s
# (BENCHMARKS.md), but one run there crashed (a segfault while XLA compiled a program with it,
# called outside jit). Four processes sharing one H200, each calling the ffi exchange and the
# low-latency pair eagerly with a new shape (a new compile) a dozen times, did not crash
# (2026-12-02); with one GPU the crash's two-GPU path could not be run. `xla` stays first until
# it is.
_BACKENDS = {"xla": xla, "ffi": ffi, "reference": reference}
# The name scope of every exchange: a profile of a step finds the transport's work by it.
SCOPE = "jep_exchange"


def names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def available(platform: str | None = None, axis_name=None) -> tuple[str, ...]:
    """The transports that run on `platform` (default: the current one) over `axis_name`,
    fastest first."""
    platform = platform or current_platform()
    return tuple(name for name, m in _BACKENDS.items() if m.runs_on(platform, axis_name))


def resolve(backend: str, platform: str | None = None, axis_name=None) -> str:
    """The registered name `backend` stands for ("auto": the fastest that runs on `platform`
    over `axis_name`; `ffi` only where the axis's devices are in this process)."""
    platform = platform or current_platform()
    if backend == "auto":
        return available(platform, axis_name)[0]
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {names()}, got {backend!r}")
    if not _BACKENDS[backend].runs_on(platform, axis_name):
        raise ValueError(
            f"transport backend={backend!r} does not run on {platform!r}"
            + (f" over axis {axis_name!r}" if axis_name is not None else "") + ": "
            f"{_BACKENDS[backend].UNAVAILABLE} Use backend='reference' or 'auto' there.")
    return backend


def get(name: str):
    """The `exchange` function of a registered transport."""
    return _BACKENDS[name].exchange


def _received_from(count, out_rows: int, num_rows: int):
    """i32[out_rows]: the row of the sent ones each received row is, on an axis of one rank
    (row r for r < count, else `num_rows`: none, a zero row)."""
    row = jnp.arange(out_rows, dtype=jnp.int32)
    return jnp.where(row < count, row, num_rows)


def _options(module, axis_name, out_rows, max_rows_per_peer, timeout_s, op) -> dict:
    kwargs = dict(axis_name=axis_name, out_rows=out_rows, max_rows_per_peer=max_rows_per_peer)
    if getattr(module, "TIMES_OUT", False):
        kwargs["timeout_s"] = timeout_s
    if getattr(module, "TAKES_OP", False):
        kwargs["op"] = op
    return kwargs


def exchange(backend: str, rows, send_sizes, recv_sizes, *, axis_name, out_rows: int,
             max_rows_per_peer: int, index=None, expansion=None, permute: str = "xla",
             timeout_s: float | None = None, op=None):
    """The transport's exchange of `rows[index]` (of `rows` when index is None; an index out of
    range sends a zero row), [out_rows, *F].

    expansion: None, or (dest i32[out_rows, k], source i32[C]): the received rows expanded, and
      the result is [C, *F] with row q = received row source[q] (zero where source[q] is out of
      range); dest is its inverse, received row r lands in the rows dest[r, j] (out of range:
      nowhere), which must fill a prefix of the C rows.
    permute: gathers the rows where the transport does not (`jep.layout.take_rows`).
    timeout_s: how long a transport that waits for its peers does (None: its default).
    op: the exchange's id, for a transport whose devices meet by one (None: drawn when traced).

    On an axis of one rank nothing crosses: the rows are gathered in place, once.
    """
    if lax.axis_size(axis_name) == 1:
        # One rank: what it receives is what it sends. One gather does the selection, the
        # exchange and the expansion at once.
        pick = _received_from(recv_sizes[0], out_rows, rows.shape[0])
        if index is not None:
            pick = jnp.where(pick < index.shape[0],
                             index[jnp.minimum(pick, index.shape[0] - 1)], rows.shape[0])
        if expansion is not None:
            source = expansion[1]
            inside = (source >= 0) & (source < out_rows)
            pick = jnp.where(inside, pick[jnp.clip(source, 0, out_rows - 1)], rows.shape[0])
        return take_rows(rows, pick, permute)
    module = _BACKENDS[backend]
    kwargs = _options(module, axis_name, out_rows, max_rows_per_peer, timeout_s, op)
    if index is not None:
        if getattr(module, "GATHERS", False):
            kwargs["index"] = index
        else:
            rows = take_rows(rows, index, permute)
    expands = expansion is not None and getattr(module, "EXPANDS", False)
    if expands:
        dest, source = expansion
        kwargs |= dict(expand=dest, expanded_rows=source.shape[0])
    with jax.named_scope(SCOPE):
        received = module.exchange(rows, send_sizes, recv_sizes, **kwargs)
    if expansion is None or expands:
        return received
    return take_rows(received, expansion[1], permute)


def exchange_sum(backend: str, rows, send_sizes, recv_sizes, slot_row, slot_mask, *, axis_name,
                 out_rows: int, max_rows_per_peer: int, permute: str = "xla",
                 timeout_s: float | None = None, op=None):
    """Exchanges `rows` and adds, for each token t, the received rows `slot_row[t, j]` with
    `slot_mask[t, j]`: [T, *F] in rows.dtype, added in float32 in slot order.

    slot_row: i32[T, k], rows of the exchange's result (`out_rows` of them).
    slot_mask: bool[T, k], the slots to add (a token's row from one rank is added once).
    permute: adds the received rows where the transport does not (`jep.layout.sum_rows`).
    timeout_s, op: as for `exchange`.

    On an axis of one rank nothing crosses: the rows are added in place.
    """
    if lax.axis_size(axis_name) == 1:  # one rank: the received rows are the sent ones
        received = jnp.minimum(recv_sizes[0], out_rows)
        keep = slot_mask & (slot_row >= 0) & (slot_row < received)
        return sum_rows(rows, jnp.where(keep, slot_row, rows.shape[0]), permute=permute)
    module = _BACKENDS[backend]
    kwargs = _options(module, axis_name, out_rows, max_rows_per_peer, timeout_s, op)
    with jax.named_scope(SCOPE):
        if hasattr(module, "exchange_sum"):
            return module.exchange_sum(rows, send_sizes, recv_sizes, slot_row, slot_mask, **kwargs)
        received = module.exchange(rows, send_sizes, recv_sizes, **kwargs)
    return sum_rows(received, jnp.where(slot_mask, slot_row, out_rows), permute=permute)
