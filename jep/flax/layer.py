"""What the linen and NNX modules share: their parameters (shapes, shardings, initializers) and
the forward pass over them, so the two modules stay thin shells."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import numpy as np

from jep import balance
from jep.config import MoEConfig
from jep.moe import EXPERT_PARAMS, moe, place


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    sharding: tuple  # mesh axis (or None) per dimension
    init: object  # jax.nn.initializers-style: (key, shape, dtype) -> array
    follows_param_dtype: bool  # False: float32 whatever param_dtype is (the router)


def _fan_in(in_axis):
    return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=in_axis, out_axis=-1)


def param_specs(hidden: int, ffn: int, shared_ffn: int, config: MoEConfig,
                shared_expert_gate: bool = False) -> dict[str, ParamSpec]:
    """The layer's parameters: `jep.moe`'s (router f32[H, E], w_gate/w_up [E, H, F],
    w_down [E, F, H], experts sharded over the EP axis) and, when `shared_ffn` > 0, a
    DeepSeek-style shared expert (shared_gate/shared_up [H, F_s], shared_down [F_s, H]),
    replicated, with `shared_expert_gate` its Qwen2-MoE gate [H, 1]."""
    if shared_expert_gate and not shared_ffn:
        raise ValueError("shared_expert_gate scales the shared expert: it needs shared_ffn > 0")
    num_experts, ep = config.num_experts, config.axis_name
    expert_init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    specs = {
        "router": ParamSpec((hidden, num_experts), (None, None),
                            jax.nn.initializers.normal(0.02), False),
        "w_gate": ParamSpec((num_experts, hidden, ffn), (ep, None, None), expert_init, True),
        "w_up": ParamSpec((num_experts, hidden, ffn), (ep, None, None), expert_init, True),
        "w_down": ParamSpec((num_experts, ffn, hidden), (ep, None, None), expert_init, True),
    }
    if shared_ffn:
        specs |= {
            "shared_gate": ParamSpec((hidden, shared_ffn), (None, None), _fan_in(0), True),
            "shared_up": ParamSpec((hidden, shared_ffn), (None, None), _fan_in(0), True),
            "shared_down": ParamSpec((shared_ffn, hidden), (None, None), _fan_in(0), True),
        }
    if shared_expert_gate:
        specs["shared_expert_gate"] = ParamSpec((hidden, 1), (None, None), _fan_in(0), True)
    return specs


def init_sharded(spec: ParamSpec, key, dtype, slots=None):
    """Initializes one parameter, placed on its sharding when the current mesh has explicit axes
    (where a sharding is a type, not a hint). `slots` (i32[P], the logical expert of each
    physical slot): an expert weight is drawn per logical expert, then copied to its slots."""
    value = spec.init(key, spec.shape, dtype if spec.follows_param_dtype else jnp.float32)
    if slots is not None:
        value = value[jnp.asarray(slots)]
    mesh = jax.sharding.get_abstract_mesh()
    return value if mesh.empty else place(value, mesh, P(*spec.sharding))


def check_bias_rate(rate: float) -> None:
    if not rate >= 0:
        raise ValueError(f"bias_rate must be >= 0, got {rate!r}")


def ep_size(mesh, config: MoEConfig) -> int:
    """The size of the EP axis of `mesh` (default: the mesh set with `jax.set_mesh`)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or any(a not in mesh.axis_names for a in config.ep_axes):
        raise ValueError("num_replicas needs the mesh (mesh= or jax.set_mesh) with the EP axis "
                         f"{config.axis_name!r}")
    return config.ep_size(mesh)


def first_placement(config: MoEConfig, num_replicas: int, num_nodes, mesh) -> balance.Placement:
    """A layer's placement before any load is known: the copies spread over even loads."""
    return balance.place_experts(np.ones(config.num_experts), num_replicas=num_replicas,
                                 num_ranks=ep_size(mesh, config), num_nodes=num_nodes)


def is_expert_weight(names: tuple, module: tuple) -> bool:
    """Whether a linen state path (`names`, plain keys) is at an expert weight of the layer at
    path `module`: the module's names, then the weight's (a boxed value or an optimizer moment
    may follow). (NNX finds its expert weights by type: `jep.nnx.ExpertWeight`.)"""
    def holds(run):
        return any(names[i:i + len(run)] == run for i in range(len(names) - len(run) + 1))
    return any(holds(module + (w,)) for w in EXPERT_PARAMS)


def apply(x, params: dict, *, config: MoEConfig, mesh=None, placement=None):
    """The layer: `jep.moe` (the routed experts, and the shared expert if there is one)."""
    built_for = params["router"].shape[0]
    if jnp.ndim(x) < 1 or x.shape[-1] != built_for:
        raise ValueError(
            f"x must have shape [..., {built_for}] (the hidden size the layer was built for), "
            f"got {jnp.shape(x)}")
    return moe(x, params, config=config, mesh=mesh, placement=placement)
