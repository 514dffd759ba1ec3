"""`jep.flax.MoE`: the MoE layer as a Flax linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

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

    Attributes:
      config: `jep.MoEConfig`.
      ffn: F, hidden width of each routed expert.
      shared_ffn: hidden width of the always-on shared expert; 0 for none.
      mesh: the mesh; default the one set with `jax.set_mesh` / `jax.sharding.use_mesh`.
      param_dtype: dtype of the expert weights (the router stays float32).
      bias_rate: step of the selection-bias rule; 0 (default): no bias.
    """

    config: MoEConfig
    ffn: int
    shared_ffn: int = 0
    mesh: Any = None
    param_dtype: Any = jnp.float32
    bias_rate: float = 0.0

    @nn.compact
    def __call__(self, x):
        specs = layer.param_specs(x.shape[-1], self.ffn, self.shared_ffn, self.config)
        params = {
            name: self.param(
                name,
                nn.with_partitioning(lambda key, _shape, spec=spec: layer.init_sharded(
                    spec, key, self.param_dtype), spec.sharding),
                spec.shape)
            for name, spec in specs.items()
        }
        if not self.bias_rate >= 0:
            raise ValueError(f"bias_rate must be >= 0, got {self.bias_rate!r}")
        if self.bias_rate > 0:
            bias = self.variable("balance", "bias", jnp.zeros, (self.config.num_experts,),
                                 jnp.float32)
            params["bias"] = bias.value
        y, aux = layer.apply(x, params, config=self.config, mesh=self.mesh)
        if (self.bias_rate > 0 and self.is_mutable_collection("balance")
                and not self.is_initializing()):
            bias.value = update_bias(bias.value, aux["tokens_per_expert"], rate=self.bias_rate)
        return y, aux
