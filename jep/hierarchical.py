"""Two-level dispatch and combine over a (node, local) pair of mesh axes, DeepEP's way.

Past one machine the link between nodes is the slow one, so a token crosses it at most once per
destination node: first to the rank with its own local index on each node that holds one of its
experts (an exchange over the `node` axis only), then, inside that node, to the ranks of its
experts there (an exchange over the `local` axis). Combine mirrors it: each rank adds a token's
expert outputs with their weights, the node's intermediate rank adds its ranks' rows, and one
row per (token, node) crosses back home, where the rows are added.

Both hops are plain `jep.dispatch` / `jep.combine`, so gradients come from theirs:
  hop 1 (node):  dispatch over `node` with one "expert" per node, each token's slots reduced to
                 its distinct nodes; the token's expert ids and weights travel with it as rows.
  hop 2 (local): dispatch over `local` of the rows that arrived, with the experts of this node.
Shapes (per rank): T tokens, k = top_k, N nodes, L ranks a node, E experts, E_node = E / N,
C1 = N * T rows after hop 1, C = L * C1 * min(k, E_local) rows after hop 2 (the flat mode's C).

Rows are summed in float32 at each stage and rounded to the row dtype between the stages (one
rounding more than the flat mode).

FP8 dispatch (`fp8=True`): each token is quantized once at home (`jep.fp8.pack_rows`) and its
packed row crosses both hops as it is, to be dequantized once where it arrives, before the
expansion into expert rows; the gradient is the two hops' combines in the cotangent's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jep import flat
from jep.fp8 import pack_rows, unpack_rows
from jep.layout import take_rows


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["node", "local", "num_invalid_ids"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class HierarchicalHandle:
    """What `combine` needs to walk a hierarchical dispatch back: the handles of the two hops.

    node: the `DispatchHandle` of hop 1 (over the node axis, one slot per destination node).
    local: the `DispatchHandle` of hop 2 (over the local axis, this node's experts).
    num_invalid_ids: i32[], this rank's slots whose expert id is >= E (sent nowhere).
    """

    node: flat.DispatchHandle
    local: flat.DispatchHandle
    num_invalid_ids: jax.Array

    @property
    def num_dropped(self):
        return self.local.num_dropped

    @property
    def group_sizes(self):
        return self.local.group_sizes


def node_slots(expert_ids, *, experts_per_node: int, num_nodes: int):
    """i32[T, k]: the node of each slot's expert, -1 for a slot whose node an earlier slot of
    the token already names (and for an empty slot): each token goes to each node once."""
    valid = (expert_ids >= 0) & (expert_ids < experts_per_node * num_nodes)
    node = jnp.where(valid, expert_ids // experts_per_node, -1).astype(jnp.int32)
    first = flat.first_slots(node) == jnp.arange(node.shape[1])
    return jnp.where(first, node, -1)


def _rows_as_data(values, handle, site):
    """[T, k] per-token values sent along hop 1 as float32 rows: [C1, k]."""
    return flat._dispatch_rows(values.astype(jnp.float32), handle, site)


# The op ids of a call's exchanges (`flat.op_id`): hop 1's from `site` on, then the others'.
DISPATCH_OPS = 2 * flat.DISPATCH_OPS + flat.DISPATCH_ROWS_OPS
COMBINE_OPS = flat.DISPATCH_ROWS_OPS + 2 * flat.COMBINE_OPS


@jax.custom_vjp
def _dispatch_fp8_rows(x, node_handle, local_handle, node_site, local_site):
    """x [T, H] -> recv_x [C, H] over both hops, each token packed in e4m3 with its scales
    (`pack_rows`) at home and unpacked once on arrival, before hop 2's expansion. Its
    transpose is the two hops' unweighted combines in the cotangent's dtype (straight through
    the quantization), as a bf16 hierarchical dispatch has."""
    received = flat._to_experts(node_handle, pack_rows(x), permute="xla",
                                op=flat.op_id(node_site, 0))
    arrived = take_rows(received, flat._source_rows(node_handle))  # hop 1's expansion, packed
    moved = flat._to_experts(local_handle, arrived, permute="xla", op=flat.op_id(local_site, 0))
    return flat._expand(local_handle, unpack_rows(moved, x.shape[1], x.dtype))


def _dispatch_fp8_rows_fwd(x, node_handle, local_handle, node_site, local_site):
    return (_dispatch_fp8_rows(x, node_handle, local_handle, node_site, local_site),
            (node_handle, local_handle, node_site, local_site))


def _dispatch_fp8_rows_bwd(residuals, g):
    node_handle, local_handle, node_site, local_site = residuals
    arrived = flat._dispatch_rows_bwd((local_handle, local_site), g)[0]
    return flat._dispatch_rows_bwd((node_handle, node_site), arrived)[0], None, None, None, None


_dispatch_fp8_rows.defvjp(_dispatch_fp8_rows_fwd, _dispatch_fp8_rows_bwd)


def dispatch(x, expert_ids, *, num_experts: int, axis_name, capacity, backend: str,
             permute: str, timeout_s: float | None = None, fp8: bool = False, site=None):
    """`jep.dispatch` with `mode="hierarchical"`; axis_name = (node axis, local axis). `site`:
    the first of the DISPATCH_OPS op ids its exchanges take, or None. `fp8`: the tokens cross
    both hops packed in e4m3 (`_dispatch_fp8_rows`), with the op ids the bf16 rows take."""
    node_axis, local_axis = axis_name
    num_nodes = flat.ep_size(node_axis, "jep.dispatch")
    experts_per_node = num_experts // num_nodes
    local_site = flat.op_id(site, flat.DISPATCH_OPS + flat.DISPATCH_ROWS_OPS)
    # Hop 1: each token once to each node holding one of its experts.
    to_nodes = node_slots(expert_ids, experts_per_node=experts_per_node, num_nodes=num_nodes)
    hop1 = dict(num_experts=num_nodes, axis_name=node_axis, backend=backend, permute=permute,
                timeout_s=timeout_s, site=site)
    if fp8:  # the rows move after both plans
        node_handle = flat.plan(to_nodes, **hop1)
    else:
        arrived, _, node_handle = flat.dispatch(x, to_nodes, **hop1)
    # The tokens' expert ids travel as float32 rows (exact below 2^24), shifted by one so that
    # the zero rows past the last arrival read as "no expert".
    ids = _rows_as_data(lax.stop_gradient(expert_ids + 1), node_handle,
                        flat.op_id(site, flat.DISPATCH_OPS))
    ids = jnp.round(ids).astype(jnp.int32) - 1
    # Hop 2: inside this node, to the ranks of the token's experts here.
    first = lax.axis_index(node_axis).astype(jnp.int32) * experts_per_node
    here = (ids >= first) & (ids < first + experts_per_node)
    hop2 = dict(num_experts=experts_per_node, axis_name=local_axis, capacity=capacity,
                backend=backend, permute=permute, timeout_s=timeout_s, site=local_site)
    local_ids = jnp.where(here, ids - first, -1)
    if fp8:
        local_handle = flat.plan(local_ids, **hop2)
        recv_x = _dispatch_fp8_rows(x, node_handle, local_handle, flat.op_id(site, 1),
                                    flat.op_id(local_site, 1))
        group_sizes = local_handle.group_sizes
    else:
        recv_x, group_sizes, local_handle = flat.dispatch(arrived, local_ids, **hop2)
    num_invalid = jnp.sum(expert_ids >= num_experts, dtype=jnp.int32)
    return recv_x, group_sizes, HierarchicalHandle(node_handle, local_handle, num_invalid)


def combine(y, handle: HierarchicalHandle, weights, site=None):
    """`jep.combine` for a `HierarchicalHandle`: [T, H] in y.dtype. `site`: the first of the
    COMBINE_OPS op ids its exchanges take, or None."""
    # [C1, k], the slots of hop 2's ids
    arrived_weights = _rows_as_data(weights, handle.node, site)
    partial = flat.combine(y, handle.local, arrived_weights.astype(weights.dtype),
                           flat.op_id(site, flat.DISPATCH_ROWS_OPS))
    # Weight 1 for the one slot a token has per node (ones_like: typed like `weights` under
    # shard_map, as combine's gradient for them will be).
    return flat.combine(partial, handle.node, jnp.ones_like(weights),
                        flat.op_id(site, flat.DISPATCH_ROWS_OPS + flat.COMBINE_OPS))


def node_rows(handle: HierarchicalHandle):
    """i32[]: the rows this rank sends over the node axis to other nodes (hop 1, from its
    layout): one per (token, other node it has an expert on)."""
    node_axis = handle.node.axis_name
    me = lax.axis_index(node_axis)
    sizes = handle.node.send_sizes
    return jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) == me, 0, sizes))
