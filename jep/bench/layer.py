"""One MoE layer, forward + backward: jep against the two ways JAX users write it today.

  jep:       jep.moe (dropless, the platform's best transport and grouped matmul)
  jep, N chunks: the same with DispatchConfig(num_chunks=N): each rank's tokens in N chunks that
             XLA may overlap, one chunk's exchanges with another's experts
  jep exchanges only / jep experts only: the layer's two halves apart, for how much overlap
             could gain: dispatch then combine (no experts), and the grouped experts on as
             many rows as a rank receives, laid out as dispatch lays them (no exchange)
  capacity:  GShard/Switch style: one-hot dispatch and combine einsums with capacity factor 1.25,
             experts sharded over `ep`, dense lax.all_to_all (what generic frameworks do)
  ragged:    dropless, from lax.ragged_all_to_all (one slice per peer, a row per (token, slot))
             and lax.ragged_dot only (GPU/TPU: XLA:CPU has no ragged all-to-all)
  dense floor: one dense SwiGLU per rank over T * k rows with a single expert's weights: the
             same expert flops with no routing and no data movement, whose backward still
             writes the weight gradients of all experts, as every variant must
All use the same router (softmax top-k) and SwiGLU experts; tokens are split over the EP axis
(every device). Each step is timed twice: `iters` steps in a loop inside one program
("seconds"), and at least DISPATCHED_STEPS calls of the jitted step dispatched from Python as a
training loop makes them ("seconds_dispatched": no wait on the host between steps). `MODELS` holds the expert shapes of real models (`--model`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jep
import jep.bench.profile
from jep.bench import timing
from jep.transport import xla

CAPACITY_FACTOR = 1.25
# The MoE blocks of real models: hidden, expert hidden, experts, top-k.
MODELS = {
    "deepseek-v3": dict(hidden=7168, ffn=2048, experts=256, top_k=8),
    "qwen3-30b-a3b": dict(hidden=2048, ffn=768, experts=128, top_k=8),
    "olmoe": dict(hidden=2048, ffn=1024, experts=64, top_k=8),
    "mixtral-8x7b": dict(hidden=4096, ffn=14336, experts=8, top_k=2),
}


def _swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def capacity_moe(x, router, w_gate, w_up, w_down, *, top_k, axis_name="ep",
                 capacity_factor=CAPACITY_FACTOR):
    """Per rank, inside shard_map: the GShard layer. x [T, H]; experts [E_local, ...]. Each
    (source rank, expert) pair keeps ceil(capacity_factor * T * k / E) rows, first come first kept."""
    num_tokens, hidden = x.shape
    n = lax.axis_size(axis_name)
    local = w_gate.shape[0]
    num_experts = local * n
    weights, ids = jep.route(x.astype(jnp.float32) @ router, top_k=top_k)
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    chosen = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32)  # [T, k, E]
    flat = chosen.reshape(-1, num_experts)
    position = ((jnp.cumsum(flat, 0) - flat) * flat).sum(-1).reshape(num_tokens, top_k)
    slot = jax.nn.one_hot(position, capacity, dtype=x.dtype) * (position < capacity)[..., None]
    dispatch_mask = jnp.einsum("tke,tkc->tec", chosen.astype(x.dtype), slot)
    combine_mask = jnp.einsum("tke,tkc->tec", chosen.astype(jnp.float32) * weights[..., None],
                              slot.astype(jnp.float32)).astype(x.dtype)
    expert_in = jnp.einsum("tec,th->ech", dispatch_mask, x).reshape(n, local, capacity, hidden)
    expert_in = lax.all_to_all(expert_in, axis_name, 0, 0)  # [source, local, C, H]
    expert_in = expert_in.transpose(1, 0, 2, 3).reshape(local, n * capacity, hidden)
    out = jax.vmap(_swiglu)(expert_in, w_gate, w_up, w_down)
    out = out.reshape(local, n, capacity, hidden).transpose(1, 0, 2, 3)
    out = lax.all_to_all(out, axis_name, 0, 0).reshape(num_experts, capacity, hidden)
    return jnp.einsum("tec,ech->th", combine_mask, out)


def ragged_moe(x, router, w_gate, w_up, w_down, *, top_k, axis_name="ep"):
    """Per rank, inside shard_map: dropless with lax.ragged_all_to_all + lax.ragged_dot only."""
    num_tokens, hidden = x.shape
    n = lax.axis_size(axis_name)
    local = w_gate.shape[0]
    weights, ids = jep.route(x.astype(jnp.float32) @ router, top_k=top_k)
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids)  # (token, slot) rows by expert, hence by destination rank
    rows = x[order // top_k]
    send = jnp.zeros((n,), jnp.int32).at[flat_ids // local].add(1)
    recv = lax.all_to_all(send, axis_name, 0, 0, tiled=True)
    exchange = lambda a, s, r: xla.exchange(a, s, r, axis_name=axis_name, out_rows=n * a.shape[0],  # noqa: E731
                                             max_rows_per_peer=a.shape[0], num_slices=1)
    received = exchange(rows, send, recv)
    received_ids = exchange(flat_ids[order][:, None] % local + 1, send, recv)[:, 0] - 1
    # Received rows come by source rank; ragged_dot wants them by expert.
    local_order = jnp.argsort(jnp.where(received_ids >= 0, received_ids, local))
    sizes = jnp.zeros((local,), jnp.int32).at[received_ids].add(1, mode="drop")
    h = received[local_order]
    h = jax.nn.silu(lax.ragged_dot(h, w_gate, sizes)) * lax.ragged_dot(h, w_up, sizes)
    out = jnp.zeros_like(received).at[local_order].set(lax.ragged_dot(h, w_down, sizes))
    back = xla.exchange(out, recv, send, axis_name=axis_name, out_rows=rows.shape[0],
                        max_rows_per_peer=rows.shape[0], num_slices=1)
    per_slot = jnp.zeros_like(back).at[order].set(back).reshape(num_tokens, top_k, hidden)
    return jnp.einsum("tkh,tk->th", per_slot, weights.astype(x.dtype))


def dense_floor(rows, router, w_gate, w_up, w_down):
    """Per rank, inside shard_map: a dense SwiGLU of `rows` ([T k, H]) with the weights of the
    rank's first expert. The router takes no part (its gradient is zero)."""
    del router
    return _swiglu(rows, w_gate[0], w_up[0], w_down[0])


def receive_buffer_rows(*, tokens, experts, top_k, ep) -> dict:
    """Rows of one rank's expert-input buffer: jep dropless (worst case, static) and capacity."""
    return {"dropless": ep * tokens * min(top_k, experts // ep),
            "capacity_1.25": (experts // ep) * ep * math.ceil(CAPACITY_FACTOR * tokens * top_k / experts)}


# The groups of variants `measure` can be asked for (`--layer-variants`).
VARIANT_GROUPS = {"jep": ("jep",), "chunks": ("jep, 2 chunks", "jep, 4 chunks"),
                  "halves": ("jep exchanges only", "jep experts only"),
                  "capacity": ("capacity 1.25",), "ragged": ("ragged_all_to_all + ragged_dot",),
                  "floor": ("dense floor",), "fp8": ("jep fp8",)}


# The dispatched steps of one timed run, at least: the first call's launch and the final wait
# are paid once a run, and over 3 steps they added 0.23 ms a step to Qwen3-30B-A3B's layer on an
# H200 (2.71 ms a step against 2.48 of kernels, which ran back to back in one CUDA graph a step).
DISPATCHED_STEPS = 20


def measure(*, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, dtype, iters: int,
            repeats: int, seed: int = 0, profile: bool = False, model: str | None = None,
            groups=tuple(VARIANT_GROUPS)) -> list[dict]:
    """Each variant's forward + backward step, for the variants of `groups` (keys of
    `VARIANT_GROUPS`); with `profile` also the GPU kernels, the streams' overlap and the time
    per kind of work (`jep.bench.profile.breakdown`, kept in the results) of jep's layer with
    and without chunks. `model` only names the shape in the results."""
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("ep",), axis_types=(AxisType.Auto,))
    config = jep.MoEConfig(num_experts=experts, top_k=top_k, axis_name="ep")
    params = jep.init_params(jax.random.key(seed), hidden=hidden, ffn=ffn, config=config, dtype=dtype)
    expert_spec = NamedSharding(mesh, P("ep"))
    params = {k: jax.device_put(v, expert_spec if k != "router" else NamedSharding(mesh, P()))
              for k, v in params.items()}
    rng = np.random.default_rng(seed)
    xs = jax.device_put(jnp.asarray(rng.normal(size=(2, n * tokens, hidden)), dtype),
                        NamedSharding(mesh, P(None, "ep")))
    # The floor's rows: T * k a rank, drawn apart (no copy of the tokens inside the step).
    floor_rows = jax.device_put(
        jnp.asarray(rng.normal(size=(2, n * tokens * top_k, hidden)), dtype),
        NamedSharding(mesh, P(None, "ep")))

    def baseline(layer):
        def apply(x, p):
            specs = (P("ep"), P(), P("ep"), P("ep"), P("ep"))
            fn = jax.shard_map(lambda *a: layer(*a, top_k=top_k), mesh=mesh, in_specs=specs,
                               out_specs=P("ep"))
            return fn(x, p["router"], p["w_gate"], p["w_up"], p["w_down"])
        return apply

    def chunked(num_chunks):
        chunks = dataclasses.replace(config, dispatch=jep.DispatchConfig(num_chunks=num_chunks))
        return lambda x, p: jep.moe(x, p, config=chunks, mesh=mesh)[0]

    def halves(part):
        def local(x, router, w_gate, w_up, w_down):
            weights, ids = jep.route(x.astype(jnp.float32) @ router, top_k=top_k)
            if part == "experts":  # this rank's own pairs, as many as it receives on average
                local_ids = (ids % w_gate.shape[0]).reshape(-1)
                sizes = jnp.zeros((w_gate.shape[0],), jnp.int32).at[local_ids].add(1)
                rows = x[jnp.argsort(local_ids) // top_k]
                recv_x = jnp.zeros((n * x.shape[0] * min(top_k, w_gate.shape[0]), x.shape[1]),
                                   x.dtype).at[:rows.shape[0]].set(rows)
                return jep.expert_ffn(recv_x, sizes, w_gate, w_up, w_down)[:x.shape[0]]
            recv_x, _, handle = jep.dispatch(x, ids, num_experts=experts, axis_name="ep")
            return jep.combine(recv_x, handle, weights.astype(x.dtype))

        def apply(x, p):
            specs = (P("ep"), P(), P("ep"), P("ep"), P("ep"))
            return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P("ep"))(
                x, p["router"], p["w_gate"], p["w_up"], p["w_down"])
        return apply

    # DeepSeek-V3's recipe: FP8 dispatch and FP8 expert products, each weight quantized in
    # the step.
    fp8_config = dataclasses.replace(config, expert_precision="fp8",
                                     dispatch=jep.DispatchConfig(fp8=True))
    variants = {"jep": lambda x, p: jep.moe(x, p, config=config, mesh=mesh)[0],
                "jep fp8": lambda x, p: jep.moe(x, p, config=fp8_config, mesh=mesh)[0],
                "jep, 2 chunks": chunked(2), "jep, 4 chunks": chunked(4),
                "jep exchanges only": halves("exchanges"), "jep experts only": halves("experts"),
                "capacity 1.25": baseline(capacity_moe)}
    if xla.runs_on(jep.transport.current_platform()):
        variants["ragged_all_to_all + ragged_dot"] = baseline(ragged_moe)
    variants["dense floor"] = baseline(lambda *a, top_k: dense_floor(*a))
    wanted = {name for group in groups for name in VARIANT_GROUPS[group]}
    variants = {name: apply for name, apply in variants.items() if name in wanted}

    results = []
    for name, apply in variants.items():
        def step(x, params, apply=apply):
            loss = lambda p, x: jnp.sum(apply(x, p).astype(jnp.float32) ** 2)  # noqa: E731
            return jax.grad(loss, argnums=(0, 1))(params, x)

        # params travel as arguments (never captured as constants), unrotated.
        run = jax.jit(lambda xs, params, step=step: timing.repeat_in_loop(
            lambda x: step(x, params), (xs,), iters))
        inputs = (floor_rows if name == "dense floor" else xs, params)
        entry = {"suite": "layer", "variant": name, "model": model, "tokens_per_rank": tokens,
                 "hidden": hidden, "ffn": ffn, "experts": experts, "top_k": top_k, "ranks": n,
                 "memory_bytes": None}
        try:
            compiled = run.lower(*inputs).compile()
            entry["memory_bytes"] = timing.compiled_bytes(compiled)
            seconds = timing.seconds_per_iteration(compiled, inputs, iters=iters, repeats=repeats)
            entry |= {"seconds": seconds, "tokens_per_s": n * tokens / seconds}
            # The same step as a training loop runs it: one call a step from Python.
            one_step = jax.jit(step).lower(inputs[0][0], params).compile()
            rotations = [(rows, params) for rows in inputs[0]]
            entry["seconds_dispatched"] = timing.seconds_dispatched(
                one_step, rotations, steps=max(iters, DISPATCHED_STEPS), repeats=repeats)
            if profile and name.startswith("jep"):  # the dispatched steps, as training runs
                entry["breakdown"] = jep.bench.profile.report(
                    lambda: timing.dispatch_steps(one_step, rotations, iters), (),
                    f"layer: {name}, {iters} dispatched steps", steps=iters, compiled=one_step)
        except Exception as error:  # noqa: BLE001 - an out-of-memory peer is a result, not a crash
            entry |= {"seconds": None, "tokens_per_s": None, "error": str(error).splitlines()[0][:200]}
        results.append(entry)
    # vs_capacity: the capacity MoE's time over this one's (above 1: faster than it);
    # over_dense_floor: this time over the dense floor's (1: at the floor).
    # The same from the dispatched steps: "vs_capacity_dispatched", "over_dense_floor_dispatched".
    for field, suffix in (("seconds", ""), ("seconds_dispatched", "_dispatched")):
        timed = {r["variant"]: r.get(field) for r in results}
        capacity, floor = timed.get("capacity 1.25"), timed.get("dense floor")
        for r in results:
            ok = r.get(field) is not None
            r["vs_capacity" + suffix] = capacity / r[field] if ok and capacity else None
            r["over_dense_floor" + suffix] = r[field] / floor if ok and floor else None
    for ep in (4, 8, 64):
        if experts % ep == 0:
            rows = receive_buffer_rows(tokens=tokens, experts=experts, top_k=top_k, ep=ep)
            results.append({"suite": "layer", "variant": "receive buffer", "ep": ep,
                            **{f"{k}_bytes": v * hidden * 2 for k, v in rows.items()}})
    return results
