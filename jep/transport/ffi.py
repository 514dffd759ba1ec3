"""The `ffi` transport: jep's own ragged all-to-all, an XLA FFI custom call (`jep_kernels.ragged_a2a`).

Each device reads the rows sent to it straight out of its peers' buffers: dispatch reads token
rows from the unsorted input by the send order's index (no gather pass first) and writes each
straight to its expert rows (no expansion pass after), the way home of
combine adds each token's rows from the ranks it reached in float32 as it reads them. Exact sizes,
no padding. It runs where all devices of the EP axis live in this process (CPU, and NVIDIA GPUs
with peer access); across processes it is not available and `auto` moves on.

The handlers are built on first use with the compiler present (g++ on the CPU, nvcc for CUDA).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jep.platform import concrete_mesh, current_platform
from jep_kernels import ragged_a2a
from jep_kernels.ragged_a2a import build
from jep_kernels.vma import vary_like

GATHERS = True
EXPANDS = True
TIMES_OUT = True
TAKES_OP = True
UNAVAILABLE = ("it needs every device of the EP axis in this process (with several processes: "
               "the mesh set with jax.set_mesh, so that this can be checked), the CPU or an "
               "NVIDIA GPU (with peer access between the GPUs), and a compiler (g++ on the CPU, "
               "nvcc for CUDA) on PATH.")


def runs_on(platform: str, axis_name=None) -> bool:
    """Whether the handlers run here: the CPU or NVIDIA GPUs that reach each other's memory, a
    compiler, and every device of each group along `axis_name` in this process (with several
    processes this is known only when the mesh is set with `jax.set_mesh`; without, the answer
    is no)."""
    if platform not in ("cpu", "gpu"):
        return False
    if jax.process_count() > 1 and not _within_process(axis_name):
        return False
    if build.compiler(platform) is None:
        return False
    return platform == "cpu" or ragged_a2a.gpus_reach_each_other()


def _within_process(axis_name) -> bool:
    """Whether the devices of every group along `axis_name` of the set mesh share a process."""
    mesh = concrete_mesh()
    if axis_name is None or mesh is None:
        return False
    axes = _axes(axis_name)
    if any(a not in mesh.axis_names for a in axes):
        return False
    order = [mesh.axis_names.index(a) for a in mesh.axis_names if a not in axes]
    order += [mesh.axis_names.index(a) for a in axes]
    groups = np.transpose(mesh.devices, order).reshape(-1, math.prod(mesh.shape[a] for a in axes))
    return all(len({d.process_index for d in group}) == 1 for group in groups)


def _axes(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _coords(axis_name):
    """i32[2]: (group, rank). The group numbers this device's EP group among the mesh's others:
    the devices with the same coordinates on every other mesh axis exchange together."""
    mesh = jax.sharding.get_abstract_mesh()
    ep_axes = _axes(axis_name)
    group = jnp.int32(0)
    for name in mesh.axis_names:
        if name in ep_axes or mesh.shape[name] == 1:
            continue
        if name not in mesh.manual_axes:
            raise ValueError(
                f"the ffi transport needs shard_map to be manual over every mesh axis of size > 1; "
                f"axis {name!r} is not (shard_map over all of {mesh.axis_names}, or use "
                f"backend='reference')")
        group = group * mesh.shape[name] + lax.axis_index(name).astype(jnp.int32)
    rank = lax.axis_index(axis_name).astype(jnp.int32)
    return jnp.stack([group, rank])


def prepare(axis_name):
    """(coords, EP size) of this device, with the handlers registered for this platform."""
    ragged_a2a.register(current_platform())
    return _coords(axis_name), lax.axis_size(axis_name)


def exchange(rows, send_sizes, recv_sizes, *, axis_name, out_rows, max_rows_per_peer, index=None,
             expand=None, expanded_rows=None, timeout_s=None, op=None):
    del recv_sizes, max_rows_per_peer  # each receiver reads its sizes from its senders
    coords, num_ranks = prepare(axis_name)
    out = ragged_a2a.exchange(rows, send_sizes, coords, num_ranks=num_ranks,
                              out_rows=out_rows if expand is None else expanded_rows,
                              index=index, expand=expand, timeout_s=timeout_s, op=op,
                              what=f"exchange over axis {axis_name!r}")
    return vary_like(out, rows, send_sizes, *[a for a in (index, expand) if a is not None])


def exchange_sum(rows, send_sizes, recv_sizes, slot_row, slot_mask, *, axis_name, out_rows,
                 max_rows_per_peer, timeout_s=None, op=None):
    del recv_sizes, out_rows, max_rows_per_peer
    coords, num_ranks = prepare(axis_name)
    out = ragged_a2a.exchange_sum(rows, send_sizes, coords, slot_row, slot_mask,
                                  num_ranks=num_ranks, timeout_s=timeout_s, op=op,
                                  what=f"combine over axis {axis_name!r}")
    return vary_like(out, rows, send_sizes, slot_row, slot_mask)
