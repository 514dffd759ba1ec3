"""The MoE layer as one function over a mesh, `moe`, and below it the steps it runs on each
device, in order: `_plan` (checks, sizes) -> `_local_layer`: `_route` -> per chunk
`_dispatch_chunk` (`_apply_overflow_policy`, replicas, dispatch) -> experts (all chunks in one
call) -> `_combine_chunk` -> shared expert -> `_aux`.

Shapes: T tokens (all ranks), H hidden, F expert hidden, E experts, k = top_k.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jep import _checks, balance, low_latency, routing
from jep.config import MoEConfig
from jep.dispatch import combine, dispatch
from jep.experts import ACTIVATION_FNS, expert_ffn_chunks

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")
SHARED_PARAMS = ("shared_gate", "shared_up", "shared_down")
# Optional beside the shared expert: Qwen2-MoE's per-token scale of its output (HF's name).
SHARED_EXPERT_GATE = "shared_expert_gate"


def shared_expert(x, shared: dict, activation: str):
    """The shared expert, on every token: `(act(x @ gate) * (x @ up)) @ down` (DeepSeek), times
    `sigmoid(x @ shared_expert_gate)` where `shared` holds that [H, 1] gate (Qwen2-MoE); in
    x.dtype."""
    act = ACTIVATION_FNS[activation]
    dtype = x.dtype
    hidden = act(x @ shared["shared_gate"].astype(dtype)) * (x @ shared["shared_up"].astype(dtype))
    out = hidden @ shared["shared_down"].astype(dtype)
    if SHARED_EXPERT_GATE in shared:
        out = out * jax.nn.sigmoid(x @ shared[SHARED_EXPERT_GATE].astype(dtype))
    return out


def init_params(key, *, hidden: int, ffn: int, config: MoEConfig, dtype=jnp.float32) -> dict:
    """Random parameters for `moe`: router f32[H, E] (small, so routing starts near uniform),
    w_gate and w_up [E, H, F], w_down [E, F, H] in `dtype` (scaled by 1/sqrt(fan-in))."""
    k_router, k_gate, k_up, k_down = jax.random.split(key, 4)
    num_experts = config.num_experts
    normal = jax.random.normal
    return {
        "router": 0.02 * normal(k_router, (hidden, num_experts), jnp.float32),
        "w_gate": (normal(k_gate, (num_experts, hidden, ffn)) / hidden**0.5).astype(dtype),
        "w_up": (normal(k_up, (num_experts, hidden, ffn)) / hidden**0.5).astype(dtype),
        "w_down": (normal(k_down, (num_experts, ffn, hidden)) / ffn**0.5).astype(dtype),
    }


def _check_params(params, hidden, config, num_slots):
    for name in ("router",) + EXPERT_PARAMS:
        if name not in params:
            raise ValueError(f"params must hold {name!r}; got keys {sorted(params)}")
    num_experts = config.num_experts
    _checks.shape(params["router"], (hidden, num_experts), "params['router']")
    _checks.rank(params["w_gate"], 3, "params['w_gate']")
    ffn = params["w_gate"].shape[2]
    _checks.shape(params["w_gate"], (num_slots, hidden, ffn), "params['w_gate']")
    _checks.shape(params["w_up"], (num_slots, hidden, ffn), "params['w_up']")
    _checks.shape(params["w_down"], (num_slots, ffn, hidden), "params['w_down']")
    if params.get("bias") is not None:
        _checks.shape(params["bias"], (num_experts,), "params['bias']")
    if any(name in params for name in SHARED_PARAMS):
        if not all(name in params for name in SHARED_PARAMS):
            raise ValueError(f"params must hold all of {SHARED_PARAMS} or none; got keys "
                             f"{sorted(params)}")
        _checks.rank(params["shared_gate"], 2, "params['shared_gate']")
        shared_ffn = params["shared_gate"].shape[1]
        _checks.shape(params["shared_gate"], (hidden, shared_ffn), "params['shared_gate']")
        _checks.shape(params["shared_up"], (hidden, shared_ffn), "params['shared_up']")
        _checks.shape(params["shared_down"], (shared_ffn, hidden), "params['shared_down']")
    if SHARED_EXPERT_GATE in params:
        if "shared_gate" not in params:
            raise ValueError(f"params[{SHARED_EXPERT_GATE!r}] scales a shared expert: params must "
                             f"hold {SHARED_PARAMS} too; got keys {sorted(params)}")
        _checks.shape(params[SHARED_EXPERT_GATE], (hidden, 1), f"params[{SHARED_EXPERT_GATE!r}]")


def _explicit(mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def _sharding(mesh, spec):
    return NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec


def place(x, mesh, spec):
    """Reshards x to `spec` where the mesh has explicit axes (there a sharding is a type that
    shard_map checks, not a hint); elsewhere returns x as it is."""
    if _explicit(mesh):
        return jax.sharding.reshard(x, _sharding(mesh, spec))
    return x


def _leading_spec(shape, mesh) -> P:
    """A spec for an array of `shape` [..., H] that splits its leading axes over the mesh's axes
    in order: each leading axis takes the next mesh axes while their sizes divide it; an axis
    that fits nowhere is left out (replicated)."""
    axes = list(zip(mesh.axis_names, mesh.axis_sizes))
    spec = []
    for size in shape[:-1]:
        taken = []
        while axes and size % (math.prod(n for _, n in taken) * axes[0][1]) == 0:
            taken.append(axes.pop(0))
        spec.append(tuple(name for name, _ in taken) or None)
    return P(*spec, None)


def _reshape(a, shape, mesh, spec):
    """a.reshape(shape), laid out by `spec` where the mesh has explicit axes: there a reshape
    that regroups sharded axes (tokens split over 8 devices as [4, 64, H]) must be told the
    result's sharding, and moves rows between devices to make it."""
    if tuple(a.shape) == tuple(shape):
        return a
    if _explicit(mesh):
        return lax.reshape(a, shape, out_sharding=_sharding(mesh, spec))
    return a.reshape(shape)


def moe(x, params: dict, *, config: MoEConfig, mesh=None, placement=None):
    """One routed-expert MoE layer with experts sharded over `config.axis_name`.

    Tokens are split over every axis of the mesh (in mesh order), experts over the EP axis; each
    rank routes its tokens, dispatches them, runs its local experts and combines.

    Args:
      x: f[..., H] tokens; their count T must be divisible by the number of devices of the mesh.
      params: {"router": f32[H, E], "w_gate": [E, H, F], "w_up": [E, H, F], "w_down": [E, F, H],
        optional "bias": f32[E] (selection-only routing bias), optional "shared_gate",
        "shared_up" [H, F_s] and "shared_down" [F_s, H]: a DeepSeek-style shared expert on every
        token, replicated, computed beside the routed experts (while their tokens travel), and
        with it optional "shared_expert_gate" [H, 1]: its output scaled per token by
        sigmoid(x @ shared_expert_gate), as Qwen2-MoE does}.
      config: `MoEConfig`.
      mesh: a `jax.sharding.Mesh` holding `config.axis_name`; default: the mesh set with
        `jax.set_mesh`.
      placement: optional `jep.balance.Placement` of the E logical experts on P = E + R
        physical slots (replicated hot experts). The expert weights are then per slot
        ([P, H, F] and [P, F, H], sharded over the EP axis), each token's pair goes to one copy
        of its expert (copies taken in turn), and the gradient of every copy is its logical
        expert's (the sum over its copies, `jep.balance.sum_replica_gradients`), so copies
        stay equal. Capacity applies per slot; only the "position" overflow policy.

    Returns:
      y: same shape and dtype as x.
      aux: over every token of the mesh:
        "load_balancing_loss": f32[], the Switch loss over all tokens;
        "sequence_load_balancing_loss": f32[], the same per sequence, averaged (sequences are
          x's second-to-last axis when x is [..., S, H]; a [T, H] x is one sequence);
        "router_z_loss": f32[];
        "tokens_per_expert": i32[E], pairs the router chose per expert (before any capacity
          policy; what `jep.balance.update_bias` takes);
        "expert_imbalance", "rank_imbalance": f32[], max / mean of those pairs over experts and
          over the EP ranks;
        "num_dropped": i32[], pairs the capacity dropped; "num_rerouted": i32[], pairs moved
          to another expert (`DispatchConfig.overflow="reroute"`).
    """
    mesh, plan = _plan(x, params, config=config, mesh=mesh, placement=placement)
    token_spec = P(plan.token_axes, None)
    tokens = _reshape(jnp.asarray(x), (plan.num_tokens, x.shape[-1]), mesh, token_spec)
    shared = ({name: params[name] for name in SHARED_PARAMS + (SHARED_EXPERT_GATE,)
               if name in params} if "shared_gate" in params else None)
    bias = params.get("bias")
    expert_spec = P(config.axis_name, None, None)
    args = (tokens, params["router"], params["w_gate"], params["w_up"], params["w_down"], bias,
            placement, shared)
    specs = (token_spec, P(None, None), expert_spec, expert_spec, expert_spec,
             None if bias is None else P(None),
             None if placement is None else P(),  # a spec for every leaf of the placement
             None if shared is None else P())
    args = tuple(a if a is None else jax.tree.map(lambda leaf, s=s: place(jnp.asarray(leaf), mesh, s), a)
                 for a, s in zip(args, specs))
    y, aux = _layer_program(plan, mesh, specs)(*args)
    # The result in x's shape, its leading axes split over the mesh as far as they divide.
    return _reshape(y, x.shape, mesh, _leading_spec(x.shape, mesh)), aux


@functools.lru_cache(maxsize=256)
def _layer_program(plan, mesh, specs):
    """jit(shard_map(`_local_layer`)) for one plan, mesh and input specs (all hashable): the same
    function object for the same settings, so that calling `moe` eagerly again with the same
    shapes reuses jit's compiled program instead of tracing and compiling it anew. (jit: called
    eagerly, the layer still runs as one program rather than op by op.)"""
    token_spec = specs[0]
    return jax.jit(jax.shard_map(functools.partial(_local_layer, plan), mesh=mesh,
                                 in_specs=specs, out_specs=(token_spec, P())))


# --- the steps of the layer, in the order they run -------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static facts of one call of `moe`, worked out once from the arguments.

    num_tokens: T over the mesh; local_tokens: T on one device; chunk_tokens: tokens of one
    chunk (`DispatchConfig.num_chunks`); num_slots: E, or E + replicas with a placement; ep:
    the EP size; capacity: rows per local slot and chunk, None when dropless; overflow: the
    policy in force ("position" when dropless); token_axes: every mesh axis (tokens are split
    over all of them); sequence_length: x's second-to-last axis (T for a [T, H] x);
    low_latency_mesh: the mesh where the dispatch mode is "low_latency", else None.
    """

    config: MoEConfig
    num_tokens: int
    local_tokens: int
    chunk_tokens: int
    num_slots: int
    ep: int
    capacity: int | None
    overflow: str
    token_axes: tuple
    sequence_length: int
    low_latency_mesh: object
    has_placement: bool

    @property
    def decoding(self) -> bool:
        return self.config.dispatch.mode == "low_latency"


def _plan(x, params, *, config, mesh, placement):
    """Checks `moe`'s arguments (clear errors at trace time) and works out its `_Plan`; returns
    (mesh, plan), the mesh being the one set with `jax.set_mesh` when `mesh` is None."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a jep.MoEConfig, got {type(config)}")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("moe needs a mesh: pass mesh= or set one with jax.set_mesh")
    ep = config.ep_size(mesh)
    if config.num_experts % ep:
        raise ValueError(
            f"num_experts={config.num_experts} must be divisible by the size {ep} of "
            f"axis {config.axis_name!r}")
    _checks.floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have shape [..., H], got {jnp.shape(x)}")
    num_slots = config.num_experts
    if placement is not None:
        num_slots += balance.check_placement(placement, config.num_experts, ep)
        if config.dispatch.overflow != "position":
            raise ValueError(f"placement works with DispatchConfig.overflow='position' only, got "
                             f"{config.dispatch.overflow!r}")
    _check_params(params, x.shape[-1], config, num_slots)
    num_devices, num_tokens = mesh.size, math.prod(x.shape[:-1])
    if num_tokens % num_devices:
        raise ValueError(
            f"x has {num_tokens} tokens, which the {num_devices} devices of the mesh "
            f"{dict(zip(mesh.axis_names, mesh.axis_sizes))} cannot split evenly")
    local_tokens = num_tokens // num_devices
    num_chunks = config.dispatch.num_chunks
    if local_tokens % num_chunks:
        raise ValueError(f"DispatchConfig.num_chunks={num_chunks} must divide the {local_tokens} "
                         "tokens of each device")
    chunk_tokens = local_tokens // num_chunks
    capacity = config.dispatch.capacity_for(chunk_tokens, config.top_k, num_slots // ep)
    return mesh, _Plan(
        config=config, num_tokens=num_tokens, local_tokens=local_tokens,
        chunk_tokens=chunk_tokens, num_slots=num_slots, ep=ep, capacity=capacity,
        overflow=config.dispatch.overflow if capacity is not None else "position",
        token_axes=tuple(mesh.axis_names),
        sequence_length=x.shape[-2] if jnp.ndim(x) >= 3 else num_tokens,
        low_latency_mesh=mesh if config.dispatch.mode == "low_latency" else None,
        has_placement=placement is not None)


def _local_layer(plan: _Plan, x, router, w_gate, w_up, w_down, bias, placement, shared):
    """The layer on one device (the body of `moe`'s shard_map): its tokens x [T_local, H]
    routed, dispatched chunk by chunk, through the experts, combined; -> (y, aux)."""
    config = plan.config
    logits, scores, weights, expert_ids = _route(plan, x, router, bias)
    experts = (w_gate, w_up, w_down)
    if placement is not None:
        experts = tuple(balance.tie_copies(w, placement, config.axis_name) for w in experts)
    first_token = lax.axis_index(plan.token_axes) * plan.local_tokens
    # Chunk by chunk, independent of each other: XLA may overlap one's exchanges with
    # another's experts, and the shared expert with all of them. The experts of all chunks
    # are one call: each weight gradient is computed once over every chunk's rows.
    chunks = []
    for c in range(config.dispatch.num_chunks):
        part = slice(c * plan.chunk_tokens, (c + 1) * plan.chunk_tokens)
        chunks.append(_dispatch_chunk(plan, x[part], expert_ids[part], weights[part],
                                      scores[part], bias, placement,
                                      first_token + c * plan.chunk_tokens))
    recv_xs, group_sizes, handles, chunk_weights, slot_ids, dropped, rerouted = zip(*chunks)
    expert_outs = expert_ffn_chunks(recv_xs, group_sizes, *experts, activation=config.activation,
                                    backend=config.expert_backend,
                                    precision=config.expert_precision)
    y = jnp.concatenate([_combine_chunk(plan, out, handle, w)
                         for out, handle, w in zip(expert_outs, handles, chunk_weights)])
    if shared is not None:
        y = y + shared_expert(x, shared, config.activation)
    aux = _aux(plan, logits, scores, expert_ids, jnp.concatenate(slot_ids), first_token,
               num_dropped=sum(dropped), num_rerouted=sum(rerouted))
    return y, aux


def _route(plan: _Plan, x, router, bias):
    """Router logits f32[T, E], scores, and the top-k (weights f32[T, k], expert_ids i32[T, k])."""
    config = plan.config
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    weights, expert_ids = routing.route(
        logits, top_k=config.top_k, score=config.score, num_groups=config.num_groups,
        topk_groups=config.topk_groups, bias=bias, renormalize=config.renormalize)
    return logits, routing.router_scores(logits, config.score), weights, expert_ids


def _apply_overflow_policy(plan: _Plan, expert_ids, weights, scores, bias):
    """The capacity's overflow policy before dispatch (`DispatchConfig.overflow`):
    "probability" empties the slots of lowest weight past the capacity, "reroute" moves them to
    the token's next-best expert with room (and recomputes the weights); "position" leaves the
    drops to dispatch. -> (expert_ids, weights, pairs dropped here, pairs rerouted)."""
    config = plan.config
    num_rerouted = num_dropped = jnp.int32(0)
    if plan.overflow == "probability":
        expert_ids, num_dropped = balance.keep_by_probability(
            expert_ids, weights, capacity=plan.capacity, num_experts=config.num_experts,
            axis_name=config.axis_name)
    elif plan.overflow == "reroute":
        choice = routing.selection_scores(scores, num_groups=config.num_groups,
                                          topk_groups=config.topk_groups, bias=bias)
        expert_ids, num_rerouted, num_dropped = balance.reroute(
            expert_ids, choice, capacity=plan.capacity, num_experts=config.num_experts,
            axis_name=config.axis_name)
        weights = routing.weights_of(scores, expert_ids, renormalize=config.renormalize)
    return expert_ids, weights, num_dropped, num_rerouted


def _dispatch_chunk(plan: _Plan, x, expert_ids, weights, scores, bias, placement, first_token):
    """One chunk's tokens through the overflow policy, onto replica slots (with a placement)
    and dispatched: (recv_x, group_sizes, handle, combine weights, slot ids, pairs dropped,
    pairs rerouted)."""
    config = plan.config
    expert_ids, weights, num_policy_dropped, num_rerouted = _apply_overflow_policy(
        plan, expert_ids, weights, scores, bias)
    weights = weights * config.routed_scaling_factor
    slot_ids = expert_ids
    if placement is not None:
        slot_ids = balance.replica_ids(expert_ids, placement, first_token * config.top_k)
    if plan.decoding:  # the weights travel with the tokens
        recv_x, group_sizes, handle = low_latency.dispatch(
            x, slot_ids, weights, num_experts=plan.num_slots, axis_name=config.axis_name,
            capacity=plan.capacity, mesh=plan.low_latency_mesh,
            timeout_s=config.dispatch.timeout_s, fp8=config.dispatch.fp8,
            check_ids=config.dispatch.check_ids)
    else:
        recv_x, group_sizes, handle = dispatch(
            x, slot_ids, num_experts=plan.num_slots, axis_name=config.axis_name,
            capacity=plan.capacity, backend=config.dispatch.backend,
            permute=config.dispatch.permute, mode=config.dispatch.mode,
            timeout_s=config.dispatch.timeout_s, fp8=config.dispatch.fp8,
            check_ids=config.dispatch.check_ids)
    return (recv_x, group_sizes, handle, weights, slot_ids,
            handle.num_dropped + num_policy_dropped, num_rerouted)


def _combine_chunk(plan: _Plan, expert_out, handle, weights):
    """One chunk's expert outputs home, weighted: [T_chunk, H]."""
    if plan.decoding:  # the weights travelled with the tokens
        return low_latency.combine(expert_out, handle)
    return combine(expert_out, handle, weights)


def _aux(plan: _Plan, logits, scores, routed_ids, slot_ids, first_token, *, num_dropped,
         num_rerouted) -> dict:
    """`moe`'s aux, over every token of the mesh (see `moe`)."""
    config, token_axes = plan.config, plan.token_axes
    counts = lax.psum(routing.expert_counts(routed_ids, config.num_experts), token_axes)
    slot_counts = counts if not plan.has_placement else lax.psum(
        routing.expert_counts(slot_ids, plan.num_slots), token_axes)
    return {
        "load_balancing_loss": routing.load_balancing_loss(scores, routed_ids, axis_name=token_axes),
        "sequence_load_balancing_loss": balance.sequence_load_balancing_loss(
            scores, routed_ids, sequence_length=plan.sequence_length,
            num_sequences=plan.num_tokens // plan.sequence_length, first_token=first_token,
            axis_name=token_axes),
        "router_z_loss": routing.router_z_loss(logits, axis_name=token_axes),
        "tokens_per_expert": counts,
        "expert_imbalance": balance.imbalance(counts),
        "rank_imbalance": balance.imbalance(balance.rank_loads(slot_counts, plan.ep)),
        "num_dropped": lax.psum(num_dropped, token_axes),
        "num_rerouted": lax.psum(num_rerouted, token_axes),
    }
