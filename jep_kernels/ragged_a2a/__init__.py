"""The ragged all-to-all as an XLA FFI custom call: C++ on the CPU, CUDA on NVIDIA GPUs.

All devices of an exchange live in this process. Each device's call meets the others' (a host
rendezvous exchanging buffer pointers), then *pulls* its received rows straight out of its peers'
buffers, and waits until every peer is done reading its own before it returns. Nothing is padded:
a device reads exactly the rows sent to it.

Two calls, both used inside `shard_map` (the caller passes `coords` = (group, rank): which EP group
of the mesh this device belongs to and its rank on the EP axis):

  exchange(rows, send_sizes, coords, *, num_ranks, out_rows, index=None, expand=None, op=None)
      -> [out_rows, *F]
    Rank p sends `send_sizes[q]` rows to rank q, peer 0's first; the rows it sends, in order, are
    `rows[index]` (or `rows` when index is None; an index outside [0, len(rows)) sends zeros).
    The result holds peer 0's rows for this rank, then peer 1's, ..., zeros past the last.
    With `expand` (i32[R, k], R received rows at most) the received rows are expanded on
    arrival instead: received row r is written to the rows expand[r, j] of the result that lie
    in [0, out_rows), and every other row is zero. The targets must be distinct and fill a
    prefix of the result (as `jep.dispatch`'s plan makes them: the rows of its kept pairs).
  exchange_sum(rows, send_sizes, coords, slot_row, slot_mask, *, num_ranks, op=None) -> [T, *F]
    Receives like `exchange` (no index) and returns, for each token t, the received rows
    slot_row[t, j] for the j with slot_mask[t, j] added in float32 in slot order, rounded once
    to rows.dtype: the fused way home of `jep.combine`.

  The devices' calls of one op meet by its id, `op`: an i32 scalar, the same on every device and
  distinct from every other op's of the program (`new_op_ids`). It is an operand, so one traced
  function (a cached `jax.jit`) called from several places of a program takes a different one
  at each; None draws a fresh id when the call is traced.

And two low-latency calls for decoding (a few tokens per rank), one each for dispatch and
combine, that need no host synchronisation on GPUs (`low_latency.h`, `jep.low_latency`):

  low_latency_dispatch(x, send_index, pair_local, pair_index, pair_weight, counts, rows_to, coords,
                       *, num_ranks, out_rows, capacity, owner, device_coords)
      -> (recv_x, group_sizes, pair_row, recv_weight, recv_count, num_dropped)
  low_latency_combine(y, pair_row, recv_weight, recv_count, home_slot, coords, *, num_ranks,
                      owner, device_coords) -> [T, *F]

  On GPUs each rank *pushes* its rows into buffers of its peers that are allocated, and whose
  addresses are exchanged, on the first run of a call of that shape; later runs only launch
  kernels, which signal arrival and reuse through flags in those buffers. So the calls run
  without the host waiting, and XLA may capture them into command buffers (CUDA graphs). A
  kernel that waits for a peer longer than the timeout stops the program with an error naming
  the ranks. The buffers belong to the `owner` the call names (`buffer_sets.h`): one set per
  owner, kind of call and shape, shared by every trace and call site, freed by
  `release_buffers(owner)`; `live_buffers(owner)` counts them.

Every call waits `timeout_s` seconds for its peers (None: `default_timeout()`, the variable
`JEP_FFI_TIMEOUT_S` or 60, read when the call is traced) and then fails with the ranks that never
came, instead of hanging. The value is part of the traced program: to change it, trace again.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jep_kernels.ragged_a2a import build

MAX_RANKS = 32  # kMaxPeers in routes.h
MAX_SLOTS = 64  # kMaxSlots in cuda.cu
_TARGETS = {"jep_ragged_exchange": "JepRaggedExchange",
            "jep_ragged_exchange_sum": "JepRaggedExchangeSum",
            "jep_low_latency_dispatch": "JepLowLatencyDispatch",
            "jep_low_latency_combine": "JepLowLatencyCombine"}
_FFI_PLATFORMS = {"cpu": "cpu", "gpu": "CUDA"}
_libraries: dict[str, ctypes.CDLL] = {}  # by platform, once registered
_lock = threading.Lock()
_op_ids = itertools.count(1)
_op_ids_lock = threading.Lock()


def default_timeout() -> float:
    """Seconds a device waits for its peers when a call does not say: `JEP_FFI_TIMEOUT_S`, else
    60. Read when a call is traced."""
    seconds = float(os.environ.get("JEP_FFI_TIMEOUT_S", 60))
    if not seconds > 0:
        raise ValueError(f"JEP_FFI_TIMEOUT_S must be > 0, got {seconds!r}")
    return seconds


def check_timeout(timeout_s: float | None, name: str = "timeout_s") -> float:
    """`timeout_s` checked (> 0), or the default for None."""
    if timeout_s is None:
        return default_timeout()
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"{name} must be a number of seconds > 0 or None, got {timeout_s!r}")
    return float(timeout_s)


def register(platform: str) -> None:
    """Builds (once, cached) and registers the handlers for `platform` ("cpu" or "gpu")."""
    with _lock:
        if platform in _libraries:
            return
        if platform not in _FFI_PLATFORMS:
            raise ValueError(f"the ffi transport runs on {tuple(_FFI_PLATFORMS)}, not {platform!r}")
        lib = ctypes.cdll.LoadLibrary(str(build.library(platform)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform=_FFI_PLATFORMS[platform])
        lib.JepLowLatencyRelease.restype = ctypes.c_int64
        lib.JepLowLatencyRelease.argtypes = [ctypes.c_int64]
        lib.JepLowLatencyLive.restype = None
        lib.JepLowLatencyLive.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                                          ctypes.POINTER(ctypes.c_int64)]
        if platform == "gpu":
            lib.JepDeviceFreeBytes.restype = ctypes.c_int64
            lib.JepDeviceFreeBytes.argtypes = [ctypes.c_int]
        _libraries[platform] = lib


def release_buffers(owner: int) -> int:
    """Frees the low-latency buffers of `owner` on every device of this process (on GPUs once
    the work queued there is done) and refuses its calls from now on. Returns the sets freed.

    A program that XLA captured into a command buffer (CUDA graph) with these calls still points
    at the freed memory: do not run it again.
    """
    freed = 0
    for platform, lib in list(_libraries.items()):
        count = lib.JepLowLatencyRelease(ctypes.c_int64(owner))
        if count < 0:
            raise RuntimeError(f"freeing the low-latency buffers of owner {owner} on {platform} "
                               "failed (a CUDA error)")
        freed += count
    return freed


def device_free_bytes(device: int = 0) -> int:
    """Free memory of this process's GPU `device` as CUDA counts it (XLA's pool, the low-latency
    buffers and all else): a debug counter. Needs the GPU handlers registered."""
    if "gpu" not in _libraries:
        raise ValueError("device_free_bytes needs the GPU handlers: register('gpu') first")
    free = _libraries["gpu"].JepDeviceFreeBytes(device)
    if free < 0:
        raise RuntimeError(f"cudaMemGetInfo failed on GPU {device}")
    return free


def live_buffers(owner: int = -1) -> tuple[int, int]:
    """(sets, bytes) of the low-latency buffers live in this process, of `owner` (every owner's
    for -1): one set per device, owner, kind of call and shape. A debug counter."""
    sets = nbytes = 0
    for lib in list(_libraries.values()):
        s, b = ctypes.c_int64(), ctypes.c_int64()
        lib.JepLowLatencyLive(ctypes.c_int64(owner), ctypes.byref(s), ctypes.byref(b))
        sets, nbytes = sets + s.value, nbytes + b.value
    return sets, nbytes


@functools.lru_cache(maxsize=None)
def gpus_reach_each_other() -> bool:
    """Whether every pair of this process's GPUs has peer access (NVLink or PCIe), which the
    CUDA handler needs to read its peers' buffers. Builds the handler."""
    try:
        gpus = jax.local_devices(backend="gpu")
    except RuntimeError:  # no GPU backend in this process
        return False
    lib = ctypes.cdll.LoadLibrary(str(build.library("gpu")))
    return bool(lib.JepPeersReachable(ctypes.c_int(len(gpus))))


def _check_ranks(num_ranks: int) -> None:
    if not 1 <= num_ranks <= MAX_RANKS:
        raise ValueError(f"the ffi transport exchanges among 1 to {MAX_RANKS} ranks, got {num_ranks}")


def new_op_ids(count: int = 1) -> int:
    """The first of `count` consecutive op ids no call of this process has had."""
    with _op_ids_lock:
        first = next(_op_ids)
        for _ in range(count - 1):
            next(_op_ids)
    return first


def _attrs(num_ranks: int, timeout_s: float | None, what: str) -> dict:
    return dict(num_ranks=np.int64(num_ranks),
                timeout_ms=np.int64(round(check_timeout(timeout_s) * 1000)), what=what)


def _exchange_coords(coords, op):
    """i32[3]: (group, rank, op), `op` a fresh id where None."""
    op = jnp.int32(new_op_ids()) if op is None else jnp.asarray(op, jnp.int32).reshape(())
    return jnp.concatenate([coords.astype(jnp.int32), op[None]])


def exchange(rows, send_sizes, coords, *, num_ranks: int, out_rows: int, index=None,
             expand=None, timeout_s: float | None = None, what: str = "exchange", op=None):
    _check_ranks(num_ranks)
    has_index, has_expand = index is not None, expand is not None
    if index is None:
        index = jnp.zeros((0,), jnp.int32)
    if expand is None:
        expand, filled = jnp.zeros((0, 1), jnp.int32), jnp.zeros((1,), jnp.int32)
    else:
        if expand.ndim != 2 or not jnp.issubdtype(expand.dtype, jnp.integer):
            raise ValueError(f"expand must be an integer array [received rows, k], got "
                             f"{expand.dtype}{list(expand.shape)}")
        expand = expand.astype(jnp.int32)
        filled = jnp.sum((expand >= 0) & (expand < out_rows), dtype=jnp.int32).reshape(1)
    out = jax.ShapeDtypeStruct((out_rows, *rows.shape[1:]), rows.dtype)
    return jax.ffi.ffi_call("jep_ragged_exchange", out)(
        rows, index.astype(jnp.int32), send_sizes.astype(jnp.int32), _exchange_coords(coords, op),
        expand, filled, has_index=has_index, has_expand=has_expand,
        **_attrs(num_ranks, timeout_s, what))


def exchange_sum(rows, send_sizes, coords, slot_row, slot_mask, *, num_ranks: int,
                 timeout_s: float | None = None, what: str = "exchange_sum", op=None):
    _check_ranks(num_ranks)
    if rows.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
        raise TypeError(f"exchange_sum adds f16, bf16, f32 or f64 rows, got {rows.dtype}")
    if slot_row.ndim != 2 or slot_row.shape[1] > MAX_SLOTS:
        raise ValueError(f"slot_row must be [T, k] with k <= {MAX_SLOTS}, got {slot_row.shape}")
    out = jax.ShapeDtypeStruct((slot_row.shape[0], *rows.shape[1:]), rows.dtype)
    return jax.ffi.ffi_call("jep_ragged_exchange_sum", out)(
        rows, send_sizes.astype(jnp.int32), slot_row.astype(jnp.int32), slot_mask.astype(bool),
        _exchange_coords(coords, op), **_attrs(num_ranks, timeout_s, what))


def _low_latency_attrs(num_ranks: int, owner: int, device_coords, timeout_s, what: str) -> dict:
    groups, ranks = device_coords
    return dict(_attrs(num_ranks, timeout_s, what), op=np.int64(new_op_ids()),
                owner=np.int64(owner),
                device_groups=np.asarray(groups, np.int64),
                device_ranks=np.asarray(ranks, np.int64))


def low_latency_dispatch(x, send_index, pair_local, pair_index, pair_weight, counts, rows_to,
                         coords, *, num_ranks: int, out_rows: int, capacity: int | None,
                         owner: int, device_coords, timeout_s: float | None = None,
                         what: str = "low-latency dispatch"):
    """One call: every rank's rows to the ranks of their experts, laid out by local expert.

    Args (this rank; n ranks, T tokens, k slots, E local experts per rank):
      x: [T, *F] rows.
      send_index: i32[n, T], the token of row j sent to rank p (rows past the count: any).
      pair_local, pair_index: i32[n, T, k], for row j to rank p and slot s, the local expert of
        rank p (-1: none) and the pair's index among this rank's pairs to that expert (in row,
        then slot order).
      pair_weight: f32[n, T, k], the routing weight of each pair.
      counts: i32[n, E], pairs to each local expert of each rank; rows_to: i32[n], rows to each.
      coords: i32[2], (group, rank) of this device.
      out_rows: C, rows of recv_x; capacity: kept pairs per local expert, None: all.
      owner: whose buffers the call uses (`release_buffers`), the same for the matching combine.
      device_coords: (groups, ranks), each a sequence over this process's device ordinals.

    Returns recv_x [C, *F] (by local expert, then sender, then the sender's order; zeros past the
    kept rows), group_sizes i32[E], pair_row i32[n * T, k] (the row of recv_x of slot s of the
    j-th row from rank p at p * T + j; C for none or dropped), recv_weight f32[n * T, k],
    recv_count i32[n] (rows from each rank), num_dropped i32[1].
    """
    _check_ranks(num_ranks)
    num_experts = counts.shape[1]
    pairs = (num_ranks * send_index.shape[1], pair_local.shape[2])
    i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    results = (jax.ShapeDtypeStruct((out_rows, *x.shape[1:]), x.dtype), i32((num_experts,)),
               i32(pairs), jax.ShapeDtypeStruct(pairs, jnp.float32), i32((num_ranks,)), i32((1,)))
    return jax.ffi.ffi_call("jep_low_latency_dispatch", results, has_side_effect=True)(
        x, send_index.astype(jnp.int32), pair_local.astype(jnp.int32),
        pair_index.astype(jnp.int32), pair_weight.astype(jnp.float32), counts.astype(jnp.int32),
        rows_to.astype(jnp.int32), coords.astype(jnp.int32),
        capacity=np.int64(-1 if capacity is None else capacity),
        **_low_latency_attrs(num_ranks, owner, device_coords, timeout_s, what))


def low_latency_combine(y, pair_row, recv_weight, recv_count, home_slot, coords, *,
                        num_ranks: int, owner: int, device_coords,
                        timeout_s: float | None = None, what: str = "low-latency combine"):
    """One call: expert outputs home, each token's pairs added with their weights.

    Args: y [C, *F], the expert outputs in recv_x's rows; pair_row, recv_weight, recv_count as
    `low_latency_dispatch` returned them; home_slot i32[T, k]: p * T + j for the first slot of
    token t on rank p (its j-th row sent there), -1 for the other slots.

    Returns [T, *F] in y.dtype: each expert rank adds a row's pairs times their weights in float32
    in slot order (one fused multiply-add each) and rounds once to y.dtype; home adds the ranks'
    rows in float32 in slot order.
    """
    _check_ranks(num_ranks)
    if y.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
        raise TypeError(f"combine adds f16, bf16, f32 or f64 rows, got {y.dtype}")
    out = jax.ShapeDtypeStruct((home_slot.shape[0], *y.shape[1:]), y.dtype)
    return jax.ffi.ffi_call("jep_low_latency_combine", out, has_side_effect=True)(
        y, pair_row.astype(jnp.int32), recv_weight.astype(jnp.float32),
        recv_count.astype(jnp.int32), home_slot.astype(jnp.int32), coords.astype(jnp.int32),
        **_low_latency_attrs(num_ranks, owner, device_coords, timeout_s, what))
