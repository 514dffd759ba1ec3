"""Where a dispatch and a combine spend their time: each piece timed alone, in its own loop.

    python benchmarks/scripts/dispatch_pieces.py --tokens 4096 --backends ffi,xla

Over every device of the machine (EP = device count), H 7168 bf16, top-8 of 256 uniform experts
by default. The pieces are jep.dispatch's internals (`jep.dispatch` module): the plan (layout,
the exchange of the expert ids, the sort of the (row, slot) pairs), the exchange of the token
rows, the expansion to one row per (token, local expert), with and without the transport doing
both at once, and combine's two halves. Each runs in a loop of its own, so the pieces do not
add up to the whole exactly. Times in us per call.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jep
from jep import flat
from jep.bench import timing, workloads



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--backends", default="ffi")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tokens, hidden, experts, top_k, iters = (args.tokens, args.hidden, args.experts, args.topk,
                                             args.iters)
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("ep",), axis_types=(AxisType.Auto,))
    spec = P(None, "ep")
    rng = np.random.default_rng(0)
    put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))  # noqa: E731
    ids = put(np.stack([workloads.expert_ids("uniform", rng, (n, tokens), experts, top_k)
                        for _ in range(2)]))
    x = put(jnp.asarray(rng.normal(size=(2, n, tokens, hidden)), jnp.bfloat16))
    weights = put(rng.random((2, n, tokens, top_k)).astype(np.float32))
    times = {}

    def run(name, body, *arrays):
        loop = jax.jit(jax.shard_map(lambda *a: body(*a)[None], mesh=mesh, in_specs=spec,
                                     out_specs=P("ep")))
        times[name] = timing.seconds_per_iteration(loop, arrays, iters=iters,
                                                   repeats=args.repeats)
        print(f"{name:45s} {times[name] * 1e6:9.1f} us", flush=True)

    for backend in args.backends.split(","):
        def plan(expert_ids, backend=backend):
            return flat._plan(expert_ids, num_experts=experts, axis_name="ep",
                                         capacity=None, backend=backend, permute="auto")

        def loop(body, stacked):
            return timing.repeat_in_loop(body, stacked, iters)

        def dispatched(x, ids, backend=backend):
            return jep.dispatch(x[0, 0], ids[0, 0], num_experts=experts, axis_name="ep",
                                backend=backend)

        def with_received(body):
            # body(handle, received rows stacked twice): the pieces after the exchange.
            def piece(x, ids):
                handle = plan(ids[0, 0])
                received = flat._to_experts(handle, x[0, 0])
                return loop(lambda r: body(handle, r), (jnp.stack([received, received * 2]),))
            return piece

        def with_recv_x(body):
            def piece(x, ids, w):
                recv_x, _, handle = dispatched(x, ids)
                return loop(lambda y, w: body(handle, y, w[0]),
                            (jnp.stack([recv_x, recv_x * 2]), w))
            return piece

        def with_plan(body):
            # body(handle, a): a piece after the plan, which is made once, outside the loop.
            def piece(x, ids):
                handle = plan(ids[0, 0])
                return loop(lambda a: body(handle, a[0]), (x,))
            return piece

        def planned(b):
            handle = plan(b[0])
            return handle.recv_pair, handle.pair_row

        run(f"{backend}: dispatch", lambda x, ids: loop(
            lambda a, b: jep.dispatch(a[0], b[0], num_experts=experts, axis_name="ep",
                                      backend=backend)[0], (x, ids)), x, ids)
        run(f"{backend}: plan", lambda ids: loop(planned, (ids,)), ids)
        run(f"{backend}: exchange of the rows", with_plan(flat._to_experts), x, ids)
        run(f"{backend}: expansion", with_received(flat._expand), x, ids)
        run(f"{backend}: exchange and expansion at once", with_plan(
            lambda h, a: flat._to_experts(h, a, expand=True)), x, ids)
        run(f"{backend}: combine", with_recv_x(lambda h, y, w: jep.combine(y, h, w)),
            x, ids, weights)
        run(f"{backend}: combine, sums on the expert rank",
            with_recv_x(lambda h, y, w: flat._reduce_pairs(
                h, y, flat._to_experts(h, w.astype(jnp.float32), "xla"))),
            x, ids, weights)
        run(f"{backend}: combine, the way home", with_received(flat._sum_home),
            x, ids)
        run(f"{backend}: exchange of 16 floats a row (fixed cost)", with_plan(
            lambda h, a: flat._to_experts(h, a[:, :16].astype(jnp.float32), "xla")),
            x, ids)
    return times


if __name__ == "__main__":
    main()
