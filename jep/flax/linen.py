"""`jep.flax.MoE`: the MoE layer as a Flax linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jep.config import MoEConfig
from jep.flax import layer


class MoE(nn.Module):
    """Routed experts sharded over the EP mesh axis, plus an optional shared expert.

    `__call__(x: f[..., H]) -> (y: f[..., H], aux)`, aux as `jep.moe` returns it
    (load_balancing_loss, router_z_loss, tokens_per_expert, num_dropped): add the losses to the
    training loss. Parameters are boxed with `nn.with_partitioning` (experts over
    `config.axis_name`, the rest replicated), so `nn.get_partition_spec` gives their shardings.

    Attributes:
      config: `jep.MoEConfig`.
      ffn: F, hidden width of each routed expert.
      shared_ffn: hidden width of the always-on shared expert; 0 for none.
      mesh: the mesh; default the one set with `jax.set_mesh` / `jax.sharding.use_mesh`.
      param_dtype: dtype of the expert weights (the router stays float32).
    """

    config: MoEConfig
    ffn: int
    shared_ffn: int = 0
    mesh: Any = None
    param_dtype: Any = jnp.float32

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
        return layer.apply(x, params, config=self.config, mesh=self.mesh)
