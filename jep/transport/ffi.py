"""The `ffi` transport: jep's own ragged all-to-all, an XLA FFI custom call (`jep_kernels.ragged_a2a`).

Each device reads the rows sent to it straight out of its peers' buffers: dispatch reads token
rows from the unsorted input by the send order's index (no gather pass first), the way home of
combine adds each token's rows from the ranks it reached in float32 as it reads them. Exact sizes,
no padding. It runs where all devices of the EP axis live in this process (CPU, and NVIDIA GPUs
with peer access); across processes it is not available and `auto` moves on.

The handlers are built on first use with the compiler present (g++ on the CPU, nvcc for CUDA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jep.platform import current_platform
from jep_kernels import ragged_a2a
from jep_kernels.ragged_a2a import build
from jep_kernels.vma import vary_like

GATHERS = True
UNAVAILABLE = ("it needs every device of the EP axis in this process, the CPU or an NVIDIA GPU, "
               "and a compiler (g++ on the CPU, nvcc for CUDA) on PATH.")


def runs_on(platform: str) -> bool:
    if platform not in ("cpu", "gpu") or jax.process_count() > 1:
        return False
    return build.compiler(platform) is not None


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


def _prepare(axis_name):
    ragged_a2a.register(current_platform())
    return _coords(axis_name), lax.axis_size(axis_name)


def exchange(rows, send_sizes, recv_sizes, *, axis_name, out_rows, max_rows_per_peer, index=None):
    del recv_sizes, max_rows_per_peer  # each receiver reads its sizes from its senders
    coords, num_ranks = _prepare(axis_name)
    out = ragged_a2a.exchange(rows, send_sizes, coords, num_ranks=num_ranks, out_rows=out_rows,
                              index=index, what=f"exchange over axis {axis_name!r}")
    return vary_like(out, rows, send_sizes, *([] if index is None else [index]))


def exchange_sum(rows, send_sizes, recv_sizes, slot_row, slot_mask, *, axis_name, out_rows,
                 max_rows_per_peer):
    del recv_sizes, out_rows, max_rows_per_peer
    coords, num_ranks = _prepare(axis_name)
    out = ragged_a2a.exchange_sum(rows, send_sizes, coords, slot_row, slot_mask,
                                  num_ranks=num_ranks, what=f"combine over axis {axis_name!r}")
    return vary_like(out, rows, send_sizes, slot_row, slot_mask)
