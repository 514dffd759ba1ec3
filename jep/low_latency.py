"""Low-latency dispatch and combine, for decoding: one custom call each way, no host waiting.

`jep.dispatch`/`jep.combine` plan each exchange with a few collectives and XLA ops and, with the
`ffi` transport, meet their peers on the host at every call: fine for thousands of tokens, too
slow when a step moves one to a few hundred. Here each direction is one XLA FFI custom call
(`jep_kernels.ragged_a2a.low_latency_dispatch` / `_combine`):

- buffers sized by T, the tokens of a rank (the static shape: pad a decoding batch to the most
  tokens a rank takes), allocated on each device at the first run of a call of that shape, with
  their addresses exchanged then; every later run only launches kernels, which push rows into
  the peers' buffers and signal through flags there, so the host never waits and XLA may capture
  the calls into command buffers (CUDA graphs);
- the buffers belong to a `Buffer` the caller holds (by default the process's
  `default_buffer()`): one set per device, direction and shape, shared by every trace and call
  site of that shape, freed by `Buffer.release()`. Decoding at several batch sizes keeps one set
  per size, not one per trace;
- dispatch sends each token once per destination rank, with its slots' local experts, indices
  and routing weights, and lays the rows out by local expert on arrival (what `expert_ffn` takes);
- combine adds each token's expert outputs with their weights on the expert rank (float32, in slot
  order) and sends one row per (token, rank) home, where the rows are added in float32.

Dispatch gives `jep.dispatch`'s results bit for bit (the same rows in the same order, capacity and
`num_dropped` included); combine gives `jep.combine`'s sums in the same order, with each weighted
term as one fused multiply-add (XLA may round those products differently: a float32 ulp or so). They run where the `ffi` transport runs: the devices of
the EP axis in this process, on the CPU (where the calls meet on the host, as the `ffi` transport
does) or on NVIDIA GPUs with peer access. Forward only: for inference.

Shapes (per rank): T tokens, H hidden, k = top_k, E experts, n = EP size, E_local = E / n,
C = n * T * min(k, E_local) rows (dropless) or E_local * capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jep import _checks, flat
from jep.dispatch import check_fp8
from jep.flat import check_dispatch_inputs, ep_size, merge_repeated_experts
from jep.fp8 import pack_rows, unpack_rows
from jep.layout import get_dispatch_layout
from jep.platform import concrete_mesh, current_platform
from jep.transport import ffi as ffi_transport
from jep_kernels import ragged_a2a
from jep_kernels.vma import vary_like


_buffer_ids = itertools.count(1)


class Buffer:
    """The device memory of the low-latency calls that name it, held by the caller.

    Each device keeps one set of buffers per direction (dispatch, combine) and shape of call,
    made on the first run of such a call and reused by every later one, in any program. The
    memory of a set: about n * T * (H * itemsize + 12 k) bytes per device (n ranks, T tokens,
    k slots, H hidden); `live()` counts the sets.

    `release()` frees them, once the work queued on each device is done. The buffer is then
    spent: tracing a call with it raises, and running a program traced with it fails. A program
    XLA captured into a CUDA graph still points at the freed memory: do not run it again.
    """

    def __init__(self):
        self.id = next(_buffer_ids)
        self.released = False

    def __repr__(self):
        return f"jep.low_latency.Buffer(id={self.id}{', released' if self.released else ''})"

    def live(self) -> tuple[int, int]:
        """(sets, bytes) of this buffer's memory now live on this process's devices."""
        return ragged_a2a.live_buffers(self.id)

    def release(self) -> None:
        """Frees this buffer's memory on every device of the process (idempotent)."""
        self.released = True
        ragged_a2a.release_buffers(self.id)


_default = Buffer()


def default_buffer() -> Buffer:
    """The buffer of the calls that name none; a fresh one once the last was released."""
    global _default
    if _default.released:
        _default = Buffer()
    return _default


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["home_slot", "pair_row", "recv_weight", "recv_count", "group_sizes",
                 "num_dropped", "num_invalid_ids"],
    meta_fields=["axis_name", "num_experts", "capacity", "device_coords", "buffer_id",
                 "timeout_s"],
)
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """What `combine` needs to bring the expert outputs home. A pytree.

    home_slot: i32[T, k], p * T + j for the first slot of token t on rank p (the j-th row this
      rank sent p), -1 for the others.
    pair_row: i32[n * T, k], the row of recv_x of slot s of the j-th row received from rank p
      (at p * T + j); C for none or dropped. recv_weight: f32[n * T, k], its routing weight.
    recv_count: i32[n], rows received from each rank.
    group_sizes: i32[E_local]; num_dropped: i32[], pairs received here past the capacity.
    num_invalid_ids: i32[], this rank's slots whose expert id is >= E (sent nowhere).
    device_coords: ((group, ...), (rank, ...)) of each device ordinal of the process.
    buffer_id: the `Buffer` whose memory the calls use; timeout_s: seconds to wait for peers.
    """

    home_slot: jax.Array
    pair_row: jax.Array
    recv_weight: jax.Array
    recv_count: jax.Array
    group_sizes: jax.Array
    num_dropped: jax.Array
    num_invalid_ids: jax.Array
    axis_name: object
    num_experts: int
    capacity: int | None
    device_coords: tuple
    buffer_id: int
    timeout_s: float


def device_coords(mesh, axis_name) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """((group, ...), (rank, ...)) indexed by the local device ordinal (`local_hardware_id`) of
    each device of `mesh` in this process (-1 for the others): its EP group (the row-major index
    over the other mesh axes, as `jep.transport.ffi` numbers them) and its rank on `axis_name`."""
    ep_axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    names = mesh.axis_names
    shape = dict(zip(names, mesh.devices.shape))
    coords = {}
    for index in np.ndindex(mesh.devices.shape):
        device = mesh.devices[index]
        if device.process_index != jax.process_index():
            continue
        at = dict(zip(names, index))
        group = 0
        for name in names:
            if name not in ep_axes and shape[name] > 1:
                group = group * shape[name] + at[name]
        rank = 0
        for name in ep_axes:
            rank = rank * shape[name] + at[name]
        ordinal = device.local_hardware_id if device.local_hardware_id is not None else device.id
        coords[ordinal] = (group, rank)
    size = max(coords) + 1
    groups = tuple(coords.get(o, (-1, -1))[0] for o in range(size))
    ranks = tuple(coords.get(o, (-1, -1))[1] for o in range(size))
    return groups, ranks


def _concrete_mesh(mesh):
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    concrete = concrete_mesh()
    if concrete is None:
        raise ValueError("the low-latency calls need the mesh with its devices: pass mesh= (a "
                         "jax.sharding.Mesh) or set it with jax.set_mesh")
    return concrete


def _check_runs(axis_name):
    platform = current_platform()
    if not ffi_transport.runs_on(platform, axis_name):
        raise ValueError(f"the low-latency calls do not run on {platform!r} over axis "
                         f"{axis_name!r}: {ffi_transport.UNAVAILABLE} Use jep.dispatch there.")


def _pair_indices(local, num_local):
    """i32[n, T, k]: each pair's index among the pairs of its (rank, local expert), in row, then
    slot order; and i32[n, E_local], the pairs of each."""
    n = local.shape[0]
    keys = jnp.where(local >= 0, local, num_local).reshape(n, -1)  # [n, T * k]
    order = jnp.argsort(keys, axis=1, stable=True)
    counts = jnp.zeros((n, num_local + 1), jnp.int32).at[
        jnp.arange(n)[:, None], keys].add(1)
    first = jnp.cumsum(counts, axis=1) - counts
    sorted_keys = jnp.take_along_axis(keys, order, axis=1)
    rank = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, :] - jnp.take_along_axis(
        first, sorted_keys, axis=1)
    index = jnp.zeros_like(keys).at[jnp.arange(n)[:, None], order].set(rank)
    return index.reshape(local.shape), counts[:, :num_local]


def _forward_only(call, name):
    """`call` with a backward pass that says it has none."""
    @jax.custom_vjp
    def run(*args):
        return call(*args)

    def fwd(*args):
        return call(*args), None

    def bwd(_, g):
        raise ValueError(f"jep.low_latency.{name} is forward only (for inference); differentiate "
                         "through jep.dispatch / jep.combine")

    run.defvjp(fwd, bwd)
    return run


def dispatch(x, expert_ids, weights, *, num_experts: int, axis_name, capacity: int | None = None,
             mesh=None, buffer: Buffer | None = None, timeout_s: float | None = None,
             fp8: bool = False, check_ids: bool = False):
    """Sends each token to the ranks of its experts, with its routing weights, in one call.

    Call inside `jax.shard_map` over `axis_name` (on every mesh axis of size > 1).

    Args:
      x: f[T, H], this rank's tokens (T: the most a rank sends a peer; pad with tokens whose
        expert_ids are all outside [0, E), which send nothing).
      expert_ids: i[T, k], global expert ids; negative ids are empty slots, ids >= E too but
        counted (`handle.num_invalid_ids`), an expert in several slots of a token sent once
        with their weights added, as in `jep.dispatch`.
      weights: f[T, k], routing weights; travel with the rows, used by `combine`.
      num_experts: E, divisible by the size of `axis_name`.
      axis_name: the EP mesh axis (or a tuple of axes).
      capacity: rows kept per local expert (the first by sender rank, then token); None: all.
      mesh: the `jax.sharding.Mesh` (default: the one set with `jax.set_mesh`).
      buffer: the `Buffer` whose memory the calls use (default: `default_buffer()`); combine
        uses the same.
      timeout_s: seconds a device waits for its peers before the program fails (None:
        `JEP_FFI_TIMEOUT_S`, else 60), fixed when the call is traced; combine waits as long.
      fp8: each token travels as e4m3 with its per-128-channel scales and is dequantized to
        x.dtype on arrival, as in `jep.dispatch(..., fp8=True)`; combine stays in y's dtype.
      check_ids: ids >= E an error under `jax.experimental.checkify.checkify`, as in
        `jep.dispatch`.

    Returns:
      recv_x: [C, H], the rows of local expert 0, then 1, ..., zeros past the kept rows (the same
        rows, in the same order, as `jep.dispatch`'s).
      group_sizes: i32[E_local].
      handle: `LowLatencyHandle` for `combine`; `handle.num_dropped` counts the pairs past the
        capacity here.
    """
    check_dispatch_inputs(x, expert_ids, num_experts=num_experts, capacity=capacity,
                          axis_name=axis_name, caller="jep.low_latency.dispatch")
    _checks.floating(weights, "weights")
    _checks.shape(weights, expert_ids.shape, "weights")
    num_tokens, top_k = expert_ids.shape
    if top_k > 32:
        raise ValueError(f"the low-latency calls take at most 32 slots per token, got {top_k}")
    _check_runs(axis_name)
    buffer = default_buffer() if buffer is None else buffer
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be a jep.low_latency.Buffer or None, got {type(buffer)}")
    if buffer.released:
        raise ValueError(f"buffer {buffer!r} was released: make a new jep.low_latency.Buffer")
    check_fp8(fp8, x)
    flat.check_ids(check_ids, expert_ids, num_experts)
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    recv_x, group_sizes, handle = _dispatch(
        pack_rows(x) if fp8 else x, expert_ids, weights, num_experts=num_experts,
        axis_name=axis_name, capacity=capacity,
        coords_of_devices=device_coords(_concrete_mesh(mesh), axis_name), buffer_id=buffer.id,
        timeout_s=ragged_a2a.check_timeout(timeout_s))
    if fp8:
        recv_x = unpack_rows(recv_x, x.shape[1], x.dtype)
    return recv_x, group_sizes, handle


def _dispatch(x, expert_ids, weights, *, num_experts, axis_name, capacity, coords_of_devices,
              buffer_id, timeout_s):
    n = ep_size(axis_name, "jep.low_latency.dispatch")
    num_tokens, top_k = expert_ids.shape
    num_local = num_experts // n
    num_rows = (n * num_tokens * min(top_k, num_local) if capacity is None
                else num_local * capacity)

    num_invalid = jnp.sum(expert_ids >= num_experts, dtype=jnp.int32)
    expert_ids, weights = merge_repeated_experts(expert_ids.astype(jnp.int32), weights)
    layout = get_dispatch_layout(expert_ids, num_experts=num_experts, num_ranks=n)
    row = jnp.arange(num_tokens, dtype=jnp.int32)
    sent = row[None, :] < layout.tokens_per_rank[:, None]  # [n, T]
    send_row = jnp.minimum(layout.send_offsets[:, None] + row[None, :],
                           layout.send_token.shape[0] - 1)
    send_index = jnp.where(sent, layout.send_token[send_row], num_tokens)  # [n, T]
    ids = jnp.take(expert_ids, send_index, axis=0, mode="fill", fill_value=-1)  # [n, T, k]
    rank = jnp.arange(n, dtype=jnp.int32)[:, None, None]
    local = ids - rank * num_local
    local = jnp.where((ids >= 0) & (ids < num_experts) & (local >= 0) & (local < num_local),
                      local, -1)
    pair_index, counts = _pair_indices(local, num_local)
    pair_weight = jnp.take(weights.astype(jnp.float32), send_index, axis=0, mode="fill",
                           fill_value=0)
    dest = jnp.where((expert_ids >= 0) & (expert_ids < num_experts), expert_ids // num_local, 0)
    home_row = layout.slot_send_row - layout.send_offsets[dest]
    home_slot = jnp.where(layout.slot_is_first, dest * num_tokens + home_row, -1)

    coords, _ = ffi_transport.prepare(axis_name)
    call = _forward_only(functools.partial(
        ragged_a2a.low_latency_dispatch, num_ranks=n, out_rows=num_rows, capacity=capacity,
        owner=buffer_id, device_coords=coords_of_devices, timeout_s=timeout_s,
        what=f"low-latency dispatch over axis {axis_name!r}"),
        "dispatch")
    recv_x, group_sizes, pair_row, recv_weight, recv_count, dropped = call(
        x, send_index, local, pair_index, pair_weight, counts, layout.tokens_per_rank, coords)
    inputs = (x, expert_ids, coords)
    recv_x, group_sizes, pair_row, recv_weight, recv_count, dropped = (
        vary_like(a, *inputs) for a in (recv_x, group_sizes, pair_row, recv_weight, recv_count,
                                        dropped))
    handle = LowLatencyHandle(
        home_slot=home_slot, pair_row=pair_row, recv_weight=recv_weight, recv_count=recv_count,
        group_sizes=group_sizes, num_dropped=dropped[0], num_invalid_ids=num_invalid,
        axis_name=axis_name, num_experts=num_experts, capacity=capacity,
        device_coords=coords_of_devices, buffer_id=buffer_id, timeout_s=timeout_s)
    return recv_x, group_sizes, handle


def combine(y, handle: LowLatencyHandle):
    """Brings the expert outputs home, each token's k outputs added with their routing weights.

    Args:
      y: f[C, H], expert outputs in the rows of `dispatch`'s recv_x (rows past the groups are
        ignored).
      handle: the `LowLatencyHandle` of the matching `dispatch`.

    Returns:
      [T, H] in y.dtype, what `jep.combine(y, handle, weights)` gives: each expert rank adds a
      token's rows times their weights in float32 in slot order (fused multiply-adds) and rounds
      once, home adds the ranks' rows in float32 in slot order.
    """
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle must be the LowLatencyHandle returned by "
                        f"jep.low_latency.dispatch, got {type(handle)}")
    _checks.rank(y, 2, "y")
    _checks.floating(y, "y")
    n = ep_size(handle.axis_name, "jep.low_latency.combine")
    coords, _ = ffi_transport.prepare(handle.axis_name)
    call = _forward_only(functools.partial(
        ragged_a2a.low_latency_combine, num_ranks=n, owner=handle.buffer_id,
        device_coords=handle.device_coords, timeout_s=handle.timeout_s,
        what=f"low-latency combine over axis {handle.axis_name!r}"), "combine")
    out = call(y, handle.pair_row, handle.recv_weight, handle.recv_count, handle.home_slot, coords)
    return vary_like(out, y, handle.home_slot, handle.pair_row)
