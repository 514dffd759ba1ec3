"""Decoding-sized dispatch and combine: jep's low-latency calls against the other ways to move the
same tokens, at a few tokens per rank.

Variants, over the EP axis of every device of the machine, T tokens per rank:
  jep low-latency:  jep.low_latency.dispatch / .combine (one custom call each way, no host wait)
  jep/<backend>:    jep.dispatch / jep.combine
  all_to_all:       lax.all_to_all of [n, T, H] per rank, the static buffers a low-latency mode
                    fills, sent dense (every token's row to every rank)
Latency is the time of one call, of `iters` written out in one jitted program; GB/s per rank =
bf16 bytes of the token rows a rank receives / time (DeepEP's count, the mean rank's rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jep
from jep import low_latency
import jep.bench.profile
from jep.bench import timing, workloads
from jep.bench.transport import _rows_per_peer


def _split(variants):
    """(x_0, ..., ids_0, ..., w_0, ...) -> [(x_r, ids_r, w_r) for each rotation r]."""
    rotation = len(variants) // 3
    return [variants[r::rotation] for r in range(rotation)]


def measure(*, tokens: int, hidden: int, experts: int, top_k: int, dtype, routing: str,
            iters: int, repeats: int, seed: int = 0, profile: bool = False,
            transports=None) -> list[dict]:
    """Each variant's latency per call (calls written out one after another in one jitted
    program: on a GPU a loop's every step waits for the host); with `profile` also each one's
    GPU kernels, printed (`jep.bench.profile`). `transports`: the backends jep.dispatch is
    timed with (default: all that run here)."""
    mesh = jax.make_mesh((len(jax.devices()),), ("ep",), axis_types=(AxisType.Auto,))
    n = mesh.size
    rng = np.random.default_rng(seed)
    rotation = 2
    ids = np.stack([workloads.expert_ids(routing, rng, (n, tokens), experts, top_k)
                    for _ in range(rotation)])  # [R, n, T, k]
    row_bytes = hidden * jnp.dtype(dtype).itemsize
    received_bytes = _rows_per_peer(ids[0], experts).sum(0).mean() * row_bytes
    x = jnp.asarray(rng.normal(size=(rotation, n, tokens, hidden)), dtype)
    weights = jnp.asarray(rng.random((rotation, n, tokens, top_k)), jnp.float32)
    spec = P("ep")
    put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    per_rank = lambda fn: jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=P("ep")))  # noqa: E731

    xs, id_sets, weight_sets = ([a[r] for r in range(rotation)] for a in (x, ids, weights))

    def ll_dispatch(x, ids, w):
        return low_latency.dispatch(x[0], ids[0], w[0], num_experts=experts, axis_name="ep",
                                    mesh=mesh)

    def dispatch_loop(*variants):
        return timing.repeat_unrolled(lambda *a: ll_dispatch(*a)[0], _split(variants), iters)[None]

    def combine_loop(*variants):
        recv_x, _, handle = ll_dispatch(*_split(variants)[0])
        ys = [(recv_x,), (recv_x * 2,)]  # rotated expert outputs
        return timing.repeat_unrolled(lambda y: low_latency.combine(y, handle), ys, iters)[None]

    def jep_dispatch_loop(backend):
        def loop(*variants):
            body = lambda x, ids, w: jep.dispatch(  # noqa: E731
                x[0], ids[0], num_experts=experts, axis_name="ep", backend=backend)[0]
            return timing.repeat_unrolled(body, _split(variants), iters)[None]
        return loop

    def jep_combine_loop(backend):
        def loop(*variants):
            x, ids, w = _split(variants)[0]
            recv_x, _, handle = jep.dispatch(x[0], ids[0], num_experts=experts, axis_name="ep",
                                             backend=backend)
            ys = [(recv_x,), (recv_x * 2,)]
            return timing.repeat_unrolled(lambda y: jep.combine(y, handle, w[0]), ys, iters)[None]
        return loop

    def dense_loop(*blocks):
        body = lambda b: lax.all_to_all(b[0], "ep", 0, 0)  # noqa: E731
        return timing.repeat_unrolled(body, [(b,) for b in blocks], iters)[None]

    args = tuple(put(a) for a in (*xs, *id_sets, *weight_sets))
    runs = {("jep low-latency", "dispatch"): (per_rank(dispatch_loop), args),
            ("jep low-latency", "combine"): (per_rank(combine_loop), args)}
    for backend in jep.transport.available() if transports is None else transports:
        runs[(f"jep/{backend}", "dispatch")] = (per_rank(jep_dispatch_loop(backend)), args)
        runs[(f"jep/{backend}", "combine")] = (per_rank(jep_combine_loop(backend)), args)
    blocks = [jnp.zeros((n, n, tokens, hidden), dtype) + xs[r][:, None] for r in range(rotation)]
    runs[("all_to_all", "dispatch and combine")] = (per_rank(dense_loop),
                                                    tuple(put(b) for b in blocks))
    if profile:
        for (variant, op), (run, run_args) in runs.items():
            jep.bench.profile.report(run, run_args, f"{variant} {op}, {tokens} tokens per rank")

    seconds = timing.seconds_interleaved(runs, iters=iters, repeats=repeats)
    results = []
    for (variant, op), value in seconds.items():
        failed = isinstance(value, Exception)
        results.append({
            "suite": "decode", "variant": variant, "op": op, "tokens_per_rank": tokens,
            "hidden": hidden, "experts": experts, "top_k": top_k, "routing": routing, "ranks": n,
            "seconds": None if failed else value, "bytes_per_rank": float(received_bytes),
            "gb_per_s": None if failed else received_bytes / value / 1e9,
            **({"error": f"{type(value).__name__}: {str(value)[:300]}"} if failed else {})})
    return results
