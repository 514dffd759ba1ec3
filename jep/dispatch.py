"""`jep.dispatch` and `jep.combine`: the public calls, in every mode. Flat mode is one exchange
(jep/flat.py, where the path of a token is drawn); hierarchical mode is one per axis of a
(node, local) pair (jep/hierarchical.py); low-latency mode is its own calls (jep/low_latency.py).

Each call runs one `jax.jit` of its static settings (`_dispatch_program`, `_combine_program`),
traced once per shape and settings and cached: called from an eager `shard_map` (where JAX runs
every operation one by one) a call compiles once, not once per operation and call. Several call
sites of one program share a cached trace, so the ids by which the devices' exchanges meet
(`jep_kernels.ragged_a2a`) are operands, drawn at each call site.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jep import flat, hierarchical, transport
from jep.config import MODES, PERMUTES
from jep.flat import DispatchHandle
from jep.fp8 import TILE
from jep_kernels.ragged_a2a import check_timeout, new_op_ids


def dispatch(x, expert_ids, *, num_experts: int, axis_name, capacity: int | None = None,
             backend: str = "auto", permute: str = "auto", mode: str = "flat",
             timeout_s: float | None = None, fp8: bool = False, check_ids: bool = False):
    """Sends each token to the ranks of its experts and groups the rows by local expert.

    Call inside `jax.shard_map` over `axis_name`; expert e lives on rank e // E_local.

    Args:
      x: f[T, H] this rank's tokens.
      expert_ids: i[T, k] each token's experts (`jep.route`). A negative id marks an empty
        slot: nothing is sent for it and it gets no output. An id >= E is a bug of the
        caller's: treated as empty too, but counted in `handle.num_invalid_ids` (and, with
        `check_ids`, an error under `jax.experimental.checkify.checkify`). An expert named in
        several slots of one token gets one row, whose output combine adds once per slot, with
        each slot's weight (the same as distinct experts with equal weights and outputs would
        give).
      num_experts: E, divisible by the size n of `axis_name`.
      axis_name: the EP mesh axis.
      capacity: `None` (dropless) or rows kept per local expert (>= 0). Rows beyond it are dropped,
        lowest source rank and token first kept, and counted in `handle.num_dropped`.
      backend: transport, "auto" or one of `jep.transport.names()`. "auto" takes `ffi` only
        where every device of the axis is in this process (`jep.transport.resolve`); in
        hierarchical mode each hop chooses for its own axis.
      permute: the row mover of the local expansion and of combine's sums: "auto" (the Pallas
        kernels of `jep_kernels.permute` on Hopper GPUs, else XLA's gathers), "pallas" or "xla".
      mode: with two EP axes, axis_name=(node axis, local axis): "flat" (one exchange over both)
        or "hierarchical" (each token once to each node over the node axis, then to its experts
        inside the node over the local axis; `jep.hierarchical`). Ranks are numbered node-major
        either way, so expert e lives on the same device in both.
      timeout_s: seconds the `ffi` transport waits for the peers of an exchange before the
        program fails with the ranks that never came (None: `JEP_FFI_TIMEOUT_S`, else 60).
        Fixed when the call is traced; combine and the gradients wait as long.
      fp8: each token travels as e4m3 with a float32 scale per 128 channels (`jep.fp8`,
        DeepSeek-V3's tiles), quantized once at home, H + H / 32 bytes instead of 2 H, and is
        dequantized to x.dtype on arrival: recv_x equals a dispatch of the dequantized tokens,
        bit for bit. H must be a multiple of 128. The gradient passes straight through the
        quantization (a combine in the cotangent's dtype). In hierarchical mode the packed row
        crosses both hops and is dequantized after the second.
      check_ids: ids >= E an error under `jax.experimental.checkify.checkify`. Off by default:
        the check is an effect of the program, and jax sends every call of a jitted function
        holding one through its slower Python dispatch path (about 1 ms more host time a call
        of a Qwen3-30B-A3B layer step on an H200 host, under the profiler).

    Returns:
      recv_x: [C, H], x.dtype: the rows of local expert 0, then 1, ...; within an expert by
        source rank, then source token. Rows past `sum(group_sizes)` are zero.
        C = n * T * min(k, E_local) when dropless, E_local * capacity otherwise.
      group_sizes: i32[E_local], rows per local expert.
      handle: `DispatchHandle` for `combine` (a `jep.hierarchical.HierarchicalHandle` in
        hierarchical mode).
    """
    flat.check_dispatch_inputs(x, expert_ids, num_experts=num_experts, capacity=capacity,
                               axis_name=axis_name, caller="jep.dispatch")
    if permute not in PERMUTES:
        raise ValueError(f"permute must be one of {PERMUTES}, got {permute!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    timeout_s = check_timeout(timeout_s)  # JEP_FFI_TIMEOUT_S read once, now, for both modes
    check_fp8(fp8, x)
    flat.check_ids(check_ids, expert_ids, num_experts)
    if mode == "low_latency":
        raise ValueError("mode='low_latency' is jep.low_latency.dispatch, which takes the routing "
                         "weights with the tokens (and jep.low_latency.combine its handle)")
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)  # a static argument: hashable
    if mode == "hierarchical":  # each hop picks its own transport
        if not (isinstance(axis_name, tuple) and len(axis_name) == 2):
            raise ValueError("mode='hierarchical' needs axis_name=(node axis, local axis), got "
                             f"axis_name={axis_name!r}")
        num_ops = hierarchical.DISPATCH_OPS
    else:
        backend = transport.resolve(backend, axis_name=axis_name)
        num_ops = flat.DISPATCH_OPS
    return _dispatch_program(x, expert_ids, jnp.int32(new_op_ids(num_ops)),
                             num_experts=num_experts, axis_name=axis_name, capacity=capacity,
                             backend=backend, permute=permute, mode=mode, timeout_s=timeout_s,
                             fp8=fp8)


@functools.partial(jax.jit, static_argnames=("num_experts", "axis_name", "capacity", "backend",
                                             "permute", "mode", "timeout_s", "fp8"))
def _dispatch_program(x, expert_ids, site, *, num_experts, axis_name, capacity, backend, permute,
                      mode, timeout_s, fp8):
    """`dispatch` after its checks, its exchanges' op ids from `site` on."""
    if mode == "hierarchical":
        return hierarchical.dispatch(x, expert_ids, num_experts=num_experts, axis_name=axis_name,
                                     capacity=capacity, backend=backend, permute=permute,
                                     timeout_s=timeout_s, fp8=fp8, site=site)
    return flat.dispatch(x, expert_ids, num_experts=num_experts, axis_name=axis_name,
                         capacity=capacity, backend=backend, permute=permute, timeout_s=timeout_s,
                         fp8=fp8, site=site)


def check_fp8(fp8, x) -> None:
    """FP8 dispatch: a bool; tokens of 128-channel tiles."""
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {fp8!r}")
    if not fp8:
        return
    if x.shape[-1] % TILE:
        raise ValueError(f"fp8 dispatch quantizes tiles of {TILE} channels: x's H must be a "
                         f"multiple of {TILE}, got shape {x.shape}")


def combine(y, handle: DispatchHandle, weights):
    """Brings expert outputs home and adds each token's k outputs with their weights.

    Args:
      y: f[C, H], expert outputs in the row order of `recv_x` (rows past the groups are ignored).
      handle: the handle of the matching `dispatch` (a `DispatchHandle`, or a
        `jep.hierarchical.HierarchicalHandle`).
      weights: f[T, k], the routing weights, in the slot order of `expert_ids`.

    Returns:
      [T, H] in y.dtype: `sum_j weights[t, j] * y[row of (t, j)]`, summed in float32; a slot that
      was dropped or empty adds nothing.
    """
    if isinstance(handle, hierarchical.HierarchicalHandle):
        num_ops = hierarchical.COMBINE_OPS
    elif isinstance(handle, DispatchHandle):
        num_ops = flat.COMBINE_OPS
    else:
        raise TypeError(f"handle must be the DispatchHandle returned by jep.dispatch, got "
                        f"{type(handle)}")
    return _combine_program(y, handle, weights, jnp.int32(new_op_ids(num_ops)))


@jax.jit
def _combine_program(y, handle, weights, site):
    """`combine`, its exchanges' op ids from `site` on."""
    if isinstance(handle, hierarchical.HierarchicalHandle):
        return hierarchical.combine(y, handle, weights, site)
    return flat.combine(y, handle, weights, site)


__all__ = ["DispatchHandle", "combine", "dispatch"]
