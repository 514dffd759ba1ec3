"""Routing and layout against the number of experts: what of a step's cost grows with E.

Per rank, over the EP axis (every device of the machine), for each E of the sweep at the same
tokens per rank:
  read logits:        one pass over the router logits f32[T, E] (each row's maximum), the
                      least any routing from them costs
  route:              jep.route from router logits f32[T, E] (scores, top-k, weights)
  layout + stats:     from expert_ids: jep.layout.get_dispatch_layout, the per-expert counts
                      over the EP group and the imbalance statistics (everything after routing
                      that sees E)
  route + layout:     both, as one program
  reroute:            the "reroute" capacity policy (capacity factor 1) after routing
`vs first E` is the time over the time at the sweep's first E. Scoring reads T x E logits, so
`route` grows with E by nature; `layout + stats` should not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jep
from jep import balance
from jep.bench import timing


def measure(*, tokens: int, experts_sweep, top_k: int, iters: int, repeats: int,
            seed: int = 0) -> list[dict]:
    mesh = jax.make_mesh((len(jax.devices()),), ("ep",), axis_types=(AxisType.Auto,))
    n = mesh.size
    rng = np.random.default_rng(seed)
    spec = P(None, "ep")
    results = []
    for experts in experts_sweep:
        if experts % n or top_k > experts:
            raise SystemExit(f"routing: E={experts} must be divisible by {n} ranks and >= k={top_k}")
        rotation = 2
        logits = jax.device_put(jnp.asarray(rng.normal(size=(rotation, n, tokens, experts)),
                                            jnp.float32), NamedSharding(mesh, spec))
        capacity = -(-tokens * top_k // (experts // n))

        def route(logits):
            return jep.route(logits, top_k=top_k)

        def layout(expert_ids):
            plan = jep.layout.get_dispatch_layout(expert_ids, num_experts=experts, num_ranks=n)
            counts = lax.psum(plan.tokens_per_expert, "ep")
            return (plan, balance.imbalance(counts),
                    balance.imbalance(balance.rank_loads(counts, n)))

        def reroute(logits):
            weights, ids = route(logits)
            return balance.reroute(ids, jep.routing.selection_scores(jep.router_scores(logits)),
                                   capacity=capacity, num_experts=experts, axis_name="ep")

        ops = {
            # The floor under any routing: one pass over the logits (each row's maximum).
            "read logits": lambda logits: logits.max(axis=-1),
            "route": route,
            "layout + stats": lambda logits: layout(route(logits)[1]),
            "route + layout": lambda logits: (route(logits), layout(route(logits)[1])),
            "reroute": reroute,
        }
        for op, body in ops.items():
            if op == "layout + stats":
                # Time the layout alone: the expert ids are inputs, routed beforehand.
                ids = jax.jit(jax.shard_map(
                    lambda l: jax.vmap(lambda x: route(x)[1])(l[:, 0])[:, None], mesh=mesh,
                    in_specs=spec, out_specs=spec))(logits)
                inner, args = (lambda ids: layout(ids[0])), (ids,)
            else:
                inner, args = (lambda logits, body=body: body(logits[0])), (logits,)
            loop = jax.jit(jax.shard_map(
                lambda *a, inner=inner: timing.repeat_in_loop(inner, a, iters)[None],
                mesh=mesh, in_specs=spec, out_specs=P("ep")))
            seconds = timing.seconds_per_iteration(loop, args, iters=iters, repeats=repeats)
            results.append({"suite": "routing", "variant": "jep", "op": op,
                            "tokens_per_rank": tokens, "experts": experts, "top_k": top_k,
                            "ranks": n, "seconds": seconds})
    for r in results:
        first = next(q for q in results if q["op"] == r["op"])
        r["vs_first_experts"] = r["seconds"] / first["seconds"]
    return results
