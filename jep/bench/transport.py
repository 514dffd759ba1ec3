"""Dispatch and combine bandwidth: every jep transport against the ways JAX users move tokens today.

Variants, all moving the same token rows over the EP axis (every device of the machine):
  jep/<backend>:      jep.dispatch / jep.combine (one row per (token, rank), layout included)
  jep/<backend> fp8:  jep.dispatch(..., fp8=True): each row as e4m3 with a float32 scale per
                      128 channels (H a multiple of 128)
  all_to_all padded:  lax.all_to_all of per-peer blocks padded to the largest peer slice (what a
                      capacity-based MoE sends)
  ragged_all_to_all:  lax.ragged_all_to_all with one slice per peer (GPU/TPU only)
  fp8 quantize, ...:  FP8 dispatch's quantize pass alone, x [T, H] to packed e4m3 rows and
                      scales (`jep.fp8.pack_rows`): XLA's fusions of `jep.fp8.quantize_rows`,
                      and on Hopper the one-pass kernel `jep_kernels.quantize` (what
                      `pack_rows` takes there), each then packed, and the kernel storing
                      straight into the packed rows (`jep_kernels.quantize.pack_rows`; op
                      "quantize", bytes = the rows read)
GB/s per rank = bytes of the token rows a rank receives / time (DeepEP's count), the mean
rank's rows: 2 H a row in bf16, H + 4 H / 128 in FP8 (e4m3 values and their scales, as DeepEP
counts its FP8 dispatch).

With --nodes N the devices form a (node, local) mesh of N nodes, and jep's dispatch and combine
run in both modes over it, flat and hierarchical (`jep.hierarchical`), each with the bytes a
rank sends across the node axis counted from the layout: flat sends a token once to each rank
of its experts on another node, hierarchical once to each other node.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jep
import jep_kernels.quantize
from jep import fp8
from jep.platform import on_hopper
from jep.bench import timing, workloads
from jep.layout import get_dispatch_layout
from jep.transport import xla

NVLINK_GBPS = 450.0  # NVLink 4 on H200, one direction: 18 links x 25 GB/s


def _mesh():
    return jax.make_mesh((len(jax.devices()),), ("ep",), axis_types=(AxisType.Auto,))


def _rows_per_peer(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """i64[n, n]: rows rank s sends to rank r (one per token per rank)."""
    num_ranks = ids.shape[0]
    return np.stack([np.asarray(get_dispatch_layout(jnp.asarray(ids[s]), num_experts=num_experts,
                                                    num_ranks=num_ranks).tokens_per_rank)
                     for s in range(num_ranks)]).astype(np.int64)


def _jep_loops(*, experts: int, axis_name, backend: str, mode: str, iters: int,
               fp8: bool = False):
    """Per-rank bodies (for shard_map) that run `iters` of jep.dispatch, and of jep.combine after
    one dispatch, on inputs rotated along their leading axis."""
    def dispatch_loop(x, ids):
        body = lambda x, ids: jep.dispatch(  # noqa: E731
            x[0], ids[0], num_experts=experts, axis_name=axis_name, backend=backend, mode=mode,
            fp8=fp8)[0]
        return timing.repeat_in_loop(body, (x, ids), iters)[None]

    def combine_loop(x, ids, weights):
        recv_x, _, handle = jep.dispatch(x[0, 0], ids[0, 0], num_experts=experts,
                                         axis_name=axis_name, backend=backend, mode=mode)
        ys = jnp.stack([recv_x, recv_x * 2])  # rotated expert outputs
        body = lambda y, w: jep.combine(y, handle, w[0])  # noqa: E731
        return timing.repeat_in_loop(body, (ys, weights), iters)[None]

    return dispatch_loop, combine_loop


def measure(*, tokens: int, hidden: int, experts: int, top_k: int, dtype, routing: str,
            iters: int, repeats: int, seed: int = 0) -> list[dict]:
    mesh = _mesh()
    n = mesh.size
    rng = np.random.default_rng(seed)
    rotation = 2
    ids = np.stack([workloads.expert_ids(routing, rng, (n, tokens), experts, top_k)
                    for _ in range(rotation)])  # [R, n, T, k]
    rows = _rows_per_peer(ids[0], experts)
    received_bytes = rows.sum(0).mean() * hidden * jnp.dtype(dtype).itemsize
    x = jnp.asarray(rng.normal(size=(rotation, n, tokens, hidden)), dtype)
    weights = jnp.asarray(rng.random((rotation, n, tokens, top_k)), jnp.float32)
    spec = P(None, "ep")
    put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    results = []

    def record(name, ops, run, args, nbytes=received_bytes):
        seconds = timing.seconds_per_iteration(run, args, iters=iters, repeats=repeats)
        for op in ops:  # a peer's one collective stands for both directions
            results.append({"suite": "transport", "variant": name, "op": op,
                            "tokens_per_rank": tokens, "hidden": hidden, "experts": experts,
                            "top_k": top_k, "routing": routing, "ranks": n, "seconds": seconds,
                            "bytes_per_rank": float(nbytes),
                            "gb_per_s": nbytes / seconds / 1e9})

    def per_rank(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=P("ep")))

    for backend in jep.transport.available():
        dispatch_loop, combine_loop = _jep_loops(experts=experts, axis_name="ep", backend=backend,
                                                 mode="flat", iters=iters)
        record(f"jep/{backend}", ["dispatch"], per_rank(dispatch_loop), (put(x), put(ids)))
        record(f"jep/{backend}", ["combine"], per_rank(combine_loop), (put(x), put(ids), put(weights)))
        if hidden % fp8.TILE == 0:
            fp8_loop, _ = _jep_loops(experts=experts, axis_name="ep", backend=backend,
                                     mode="flat", iters=iters, fp8=True)
            record(f"jep/{backend} fp8", ["dispatch"], per_rank(fp8_loop), (put(x), put(ids)),
                   nbytes=rows.sum(0).mean() * fp8.packed_width(hidden) * 4)

    if hidden % fp8.TILE == 0:
        quantizers = {"fp8 quantize, XLA fusions": lambda x: fp8.pack(*fp8.quantize_rows(x))}
        if on_hopper() and jep_kernels.quantize.kernel_takes(x[0, 0]):
            quantizers["fp8 quantize, Pallas kernel"] = lambda x: fp8.pack(
                *jep_kernels.quantize.quantize_rows(x))
        if on_hopper() and jep_kernels.quantize.pack_kernel_takes(x[0, 0]):
            quantizers["fp8 quantize, Pallas kernel into packed rows"] = (
                jep_kernels.quantize.pack_rows)
        for name, quantize in quantizers.items():
            # Rotations in buffers of their own: a slice of the stacked x that feeds the
            # kernel (a custom call) would be copied out on every iteration and timed with it.
            def quantize_loop(x, quantize=quantize):
                return timing.repeat_rotated(quantize, [(x[i, 0],) for i in range(rotation)],
                                             iters)[None]
            record(name, ["quantize"], per_rank(quantize_loop), (put(x),),
                   nbytes=tokens * hidden * jnp.dtype(dtype).itemsize)

    # Peers move the same rows; the bytes counted stay the useful ones.
    block = int(rows.max())
    blocks = jnp.zeros((rotation, n, n, block, hidden), dtype) + x[:, :, :1, None, :]

    def padded_loop(blocks):
        body = lambda b: lax.all_to_all(b[0], "ep", 0, 0)  # noqa: E731
        return timing.repeat_in_loop(body, (blocks,), iters)[None]

    run = per_rank(padded_loop)
    record("all_to_all padded", ["dispatch", "combine"], run, (put(blocks),))

    if xla.runs_on(jep.transport.current_platform()):
        send = jnp.asarray(np.broadcast_to(rows, (rotation, n, n)), jnp.int32)
        recv = jnp.asarray(np.broadcast_to(rows.T, (rotation, n, n)), jnp.int32)
        wire = jnp.zeros((rotation, n, tokens * min(top_k, n), hidden), dtype) + x[:, :, :1, :]

        def ragged_loop(wire, send, recv):
            body = lambda w, s, r: xla.exchange(w[0], s[0], r[0], axis_name="ep", out_rows=n * tokens,  # noqa: E731
                                               max_rows_per_peer=tokens, num_slices=1)
            return timing.repeat_in_loop(body, (wire, send, recv), iters)[None]

        record("ragged_all_to_all", ["dispatch", "combine"], per_rank(ragged_loop), (put(wire), put(send), put(recv)))
    return results


def _node_rows(ids: np.ndarray, num_experts: int, nodes: int) -> dict[str, float]:
    """Rows the mean rank sends to other nodes, flat and hierarchical: ids i[n, T, k]."""
    n = ids.shape[0]
    experts_per_rank, ranks_per_node = num_experts // n, n // nodes
    flat = hierarchical = 0
    for rank in range(n):
        node = rank // ranks_per_node
        for token in ids[rank]:
            ranks = {int(e) // experts_per_rank for e in token if 0 <= e < num_experts}
            flat += sum(r // ranks_per_node != node for r in ranks)
            hierarchical += len({r // ranks_per_node for r in ranks} - {node})
    return {"flat": flat / n, "hierarchical": hierarchical / n}


def measure_two_level(*, tokens: int, hidden: int, experts: int, top_k: int, dtype, routing: str,
                      nodes: int, iters: int, repeats: int, seed: int = 0) -> list[dict]:
    """jep's dispatch and combine, flat against hierarchical, over a (node, local) mesh."""
    n = len(jax.devices())
    if nodes < 2 or n % nodes or experts % n:
        raise SystemExit(f"transport --nodes {nodes}: needs 2 or more nodes dividing the {n} "
                         f"devices, and --experts {experts} divisible by {n}")
    axes = ("node", "local")
    mesh = jax.make_mesh((nodes, n // nodes), axes, axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(seed)
    rotation = 2
    ids = np.stack([workloads.expert_ids(routing, rng, (n, tokens), experts, top_k)
                    for _ in range(rotation)])
    row_bytes = hidden * jnp.dtype(dtype).itemsize
    received_bytes = _rows_per_peer(ids[0], experts).sum(0).mean() * row_bytes
    node_bytes = {mode: rows * row_bytes for mode, rows in _node_rows(ids[0], experts, nodes).items()}
    x = jnp.asarray(rng.normal(size=(rotation, n, tokens, hidden)), dtype)
    weights = jnp.asarray(rng.random((rotation, n, tokens, top_k)), jnp.float32)
    spec = P(None, axes)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    per_rank = lambda fn: jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=P(axes)))  # noqa: E731
    results = []
    for backend in jep.transport.available():
        for mode in ("flat", "hierarchical"):
            dispatch_loop, combine_loop = _jep_loops(experts=experts, axis_name=axes,
                                                     backend=backend, mode=mode, iters=iters)
            for op, fn, args in (("dispatch", dispatch_loop, (put(x), put(ids))),
                                 ("combine", combine_loop, (put(x), put(ids), put(weights)))):
                seconds = timing.seconds_per_iteration(per_rank(fn), args, iters=iters,
                                                       repeats=repeats)
                results.append({"suite": "transport", "variant": f"jep/{backend} {mode}", "op": op,
                                "tokens_per_rank": tokens, "hidden": hidden, "experts": experts,
                                "top_k": top_k, "routing": routing, "ranks": n, "nodes": nodes,
                                "seconds": seconds, "bytes_per_rank": float(received_bytes),
                                "gb_per_s": received_bytes / seconds / 1e9,
                                "node_bytes_per_rank": float(node_bytes[mode])})
    return results
