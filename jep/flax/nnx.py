"""`jep.nnx.MoE`: the MoE layer as a Flax NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jep import balance
from jep.balance import update_bias
from jep.config import MoEConfig
from jep.flax import layer


class ExpertWeight(nnx.Param):
    """A routed expert's weight, [E, ...] with the experts over the EP axis: trainable, an
    `nnx.Param` of its own type, so `nnx.state(model, ExpertWeight)` finds every layer's expert
    weights. It carries the metadata `expert_weight=True`, which `nnx.Optimizer` copies onto
    the weight's moments (its `OptVariable`s keep the metadata, not the type)."""


class SelectionBias(nnx.Variable):
    """The aux-loss-free selection bias, f32[E]: the layer's state, not a trainable parameter
    (an optimizer over `nnx.Param` leaves it alone)."""


class ExpertPlacement(nnx.Variable):
    """Where the layer's logical experts sit on its physical slots: a `jep.balance.Placement`
    of i32 arrays (state, not trainable)."""


class MoE(nnx.Module):
    """Routed experts sharded over the EP mesh axis, plus an optional shared expert.

    `__call__(x: f[..., H]) -> (y: f[..., H], aux)`, aux as `jep.moe` returns it (balancing
    losses, tokens_per_expert, imbalance, num_dropped, num_rerouted). Each `nnx.Param` carries
    its sharding (experts over `config.axis_name`, the rest replicated); built under
    `jax.set_mesh`, the parameters are created sharded. The expert weights are `ExpertWeight`s.

    Aux-loss-free balancing (DeepSeek-V3): with `bias_rate` > 0 the layer holds a selection bias
    (`self.bias`, a `SelectionBias`, zeros at first), routes with it, and after each call moves
    it by `jep.balance.update_bias` from that call's `tokens_per_expert`, unless
    `self.deterministic` (`model.eval()` sets it; `model.train()` clears it).

    Args:
      hidden: H, model width.
      ffn: F, hidden width of each routed expert.
      config: `jep.MoEConfig`.
      rngs: `nnx.Rngs` for the initializers.
      shared_ffn: hidden width of the always-on shared expert; 0 for none.
      shared_expert_gate: scale the shared expert per token by sigmoid(x @ g), g [H, 1] (the
        parameter "shared_expert_gate"), as Qwen2-MoE does.
      mesh: the mesh; default the one set with `jax.set_mesh`.
      param_dtype: dtype of the expert weights (the router stays float32).
      bias_rate: step of the selection-bias rule; 0 (default): no bias.
      num_replicas: R, redundant expert copies; num_nodes: nodes the EP ranks span, for a
        placement that keeps copies in nodes (`jep.balance.place_experts`).
    """

    def __init__(self, hidden: int, ffn: int, *, config: MoEConfig, rngs: nnx.Rngs,
                 shared_ffn: int = 0, shared_expert_gate: bool = False, mesh=None,
                 param_dtype=jnp.float32, bias_rate: float = 0.0, num_replicas: int = 0,
                 num_nodes: int | None = None):
        layer.check_bias_rate(bias_rate)
        self.config = config
        self.mesh = mesh
        self.bias_rate = bias_rate
        self.deterministic = False
        if bias_rate > 0:
            self.bias = SelectionBias(jnp.zeros((config.num_experts,), jnp.float32))
        self.num_replicas, self.num_nodes = num_replicas, num_nodes
        slots = None
        if num_replicas:
            start = layer.first_placement(config, num_replicas, num_nodes, mesh)
            self.placement = ExpertPlacement(jax.tree.map(jnp.asarray, start))
            slots = start.physical_to_logical
        params = {}
        for name, spec in layer.param_specs(hidden, ffn, shared_ffn, config,
                                            shared_expert_gate).items():
            expert = name in layer.EXPERT_PARAMS
            value = layer.init_sharded(spec, rngs.params(), param_dtype, slots if expert else None)
            params[name] = (ExpertWeight(value, out_sharding=spec.sharding, expert_weight=True)
                            if expert else nnx.Param(value, out_sharding=spec.sharding))
        self.params = nnx.Dict(params)

    def __call__(self, x):
        params = {name: p[...] for name, p in self.params.items()}
        if self.bias_rate > 0:
            params["bias"] = self.bias[...]
        placement = self.placement.get_value() if self.num_replicas else None
        y, aux = layer.apply(x, params, config=self.config, mesh=self.mesh, placement=placement)
        if self.bias_rate > 0 and not self.deterministic:
            self.bias[...] = update_bias(self.bias[...], aux["tokens_per_expert"],
                                         rate=self.bias_rate)
        return y, aux


def _inside(key: tuple, path: tuple) -> bool:
    """Whether the state path `key` runs through the module path `path`."""
    return any(key[i:i + len(path)] == path for i in range(len(key) - len(path) + 1))


def replace_experts(model, loads, optimizer=None) -> dict:
    """Re-places the replicated experts of every `MoE` in `model` (num_replicas > 0), between
    steps: a new placement from each layer's load history, and the expert weights and, when
    given, the `nnx.Optimizer`'s state of them (moments) moved to their new slots.

    Args:
      model: an NNX module holding `MoE` layers.
      loads: {path of the layer in `model` (a tuple, as `nnx.iter_graph` gives it): f[E] or
        f[steps, E] token counts (`aux["tokens_per_expert"]`)}; layers not named are kept.
      optimizer: an `nnx.Optimizer` over `model`, or None.

    Returns: {path: (old placement, new placement)} of the layers moved.
    """
    moved = {}
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, MoE) or not module.num_replicas or tuple(path) not in loads:
            continue
        old = jax.tree.map(np.asarray, module.placement.get_value())
        new = balance.place_experts(loads[tuple(path)], num_replicas=module.num_replicas,
                                    num_ranks=layer.ep_size(module.mesh, module.config),
                                    num_nodes=module.num_nodes)
        for weight in module.params.values():
            if isinstance(weight, ExpertWeight):
                weight[...] = balance.move_experts(weight[...], old, new)
        module.placement.set_value(jax.tree.map(jnp.asarray, new))
        moved[tuple(path)] = (old, new)
    if optimizer is not None and moved:
        state = nnx.state(optimizer)
        flat = dict(nnx.to_flat_state(state))
        for key, variable in flat.items():
            if not variable.get_metadata().get("expert_weight", False):
                continue
            for path, (old, new) in moved.items():  # the moment of that layer's weight
                if _inside(tuple(key), path):
                    variable[...] = balance.move_experts(variable[...], old, new)
        nnx.update(optimizer, state)
    return moved
