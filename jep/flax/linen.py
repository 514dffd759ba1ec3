"""`jep.flax.MoE`: the MoE layer as a Flax linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jep import balance
from jep.balance import update_bias
from jep.config import MoEConfig
from jep.flax import layer


class MoE(nn.Module):
    """Routed experts sharded over the EP mesh axis, plus an optional shared expert.

    `__call__(x: f[..., H]) -> (y: f[..., H], aux)`, aux as `jep.moe` returns it (balancing
    losses, tokens_per_expert, imbalance, num_dropped, num_rerouted): add the losses to the
    training loss. Parameters are boxed with `nn.with_partitioning` (experts over
    `config.axis_name`, the rest replicated), so `nn.get_partition_spec` gives their shardings.

    Aux-loss-free balancing (DeepSeek-V3): with `bias_rate` > 0 the layer keeps a selection
    bias f32[E] in the variable collection "balance" (zeros at init), routes with it, and, when
    applied with `mutable=["balance"]`, moves it by `jep.balance.update_bias` from that call's
    `tokens_per_expert` (the way BatchNorm's statistics are kept).

    Replicated hot experts: with `num_replicas` R > 0 the expert weights have E + R slots
    ([E + R, H, F], sharded over the EP axis), placed by the `jep.balance.Placement` in
    "balance"/"placement" (at first the copies go round-robin); copies start equal and get
    their logical expert's gradient, so they stay equal. `jep.flax.replace_experts` moves them,
    and their optimizer state, to a placement made from a load history, between steps.

    Attributes:
      config: `jep.MoEConfig`.
      ffn: F, hidden width of each routed expert.
      shared_ffn: hidden width of the always-on shared expert; 0 for none.
      shared_expert_gate: scale the shared expert per token by sigmoid(x @ g), g [H, 1] (the
        parameter "shared_expert_gate"), as Qwen2-MoE does.
      mesh: the mesh; default the one set with `jax.set_mesh`.
      param_dtype: dtype of the expert weights (the router stays float32).
      bias_rate: step of the selection-bias rule; 0 (default): no bias.
      num_replicas: R, redundant expert copies; num_nodes: nodes the EP ranks span.
    """

    config: MoEConfig
    ffn: int
    shared_ffn: int = 0
    shared_expert_gate: bool = False
    mesh: Any = None
    param_dtype: Any = jnp.float32
    bias_rate: float = 0.0
    num_replicas: int = 0
    num_nodes: int | None = None

    @nn.compact
    def __call__(self, x):
        specs = layer.param_specs(x.shape[-1], self.ffn, self.shared_ffn, self.config,
                                  self.shared_expert_gate)
        placement = None
        if self.num_replicas:
            placement = self.variable("balance", "placement", lambda: jax.tree.map(
                jnp.asarray, layer.first_placement(self.config, self.num_replicas,
                                                   self.num_nodes, self.mesh)))
        slots = None if placement is None else placement.value.physical_to_logical
        params = {
            name: self.param(
                name,
                nn.with_partitioning(lambda key, _shape, spec=spec, name=name: layer.init_sharded(
                    spec, key, self.param_dtype,
                    slots if name in layer.EXPERT_PARAMS else None), spec.sharding),
                spec.shape)
            for name, spec in specs.items()
        }
        layer.check_bias_rate(self.bias_rate)
        if self.bias_rate > 0:
            bias = self.variable("balance", "bias", jnp.zeros, (self.config.num_experts,),
                                 jnp.float32)
            params["bias"] = bias.value
        y, aux = layer.apply(x, params, config=self.config, mesh=self.mesh,
                             placement=None if placement is None else placement.value)
        if (self.bias_rate > 0 and self.is_mutable_collection("balance")
                and not self.is_initializing()):
            bias.value = update_bias(bias.value, aux["tokens_per_expert"], rate=self.bias_rate)
        return y, aux


def _names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def replace_experts(variables, loads, *, num_ranks: int, num_nodes: int | None = None,
                    opt_state=None):
    """Re-places the replicated experts of the `MoE` layers in `variables`, between steps.

    Args:
      variables: the model's variables, holding each replicated layer's "balance"/"placement".
      loads: {path of the layer (a tuple of module names, as in `variables["balance"]`): f[E]
        or f[steps, E] token counts (`aux["tokens_per_expert"]`)}.
      num_ranks: n, the size of the EP axis; num_nodes: as for `jep.balance.place_experts`.
      opt_state: the optax state of the parameters, or None; every leaf of it at a layer's
        expert weight (Adam's moments, ...) moves with the weight.

    Returns:
      (variables, opt_state): new trees with the new placements and the moved slots.
    """
    moves = {}
    for path, placement in _placements(variables.get("balance", {})):
        if path in loads:
            old = jax.tree.map(np.asarray, placement)
            num_replicas = old.physical_to_logical.shape[0] - old.replica_count.shape[0]
            moves[path] = (old, balance.place_experts(loads[path], num_replicas=num_replicas,
                                                      num_ranks=num_ranks, num_nodes=num_nodes))

    def move(path, leaf):
        for module, (old, new) in moves.items():
            if layer.is_expert_weight(_names(path), module):
                return balance.move_experts(leaf, old, new)
        return leaf

    params = jax.tree_util.tree_map_with_path(move, variables["params"])
    placements = dict(variables["balance"])
    for module, (_, new) in moves.items():
        placements = _set(placements, module + ("placement",), jax.tree.map(jnp.asarray, new))
    variables = {**variables, "params": params, "balance": placements}
    if opt_state is not None:
        opt_state = jax.tree_util.tree_map_with_path(move, opt_state)
    return variables, opt_state


def _placements(tree, prefix=()):
    """(module path, Placement) of every "placement" entry of a "balance" collection."""
    for key, value in tree.items():
        if key == "placement":
            yield prefix, value
        elif isinstance(value, dict) or hasattr(value, "items"):
            yield from _placements(value, prefix + (key,))


def _set(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(dict(tree[path[0]]), path[1:], value)}
