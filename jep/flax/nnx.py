"""`jep.nnx.MoE`: the MoE layer as a Flax NNX module."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jep.config import MoEConfig
from jep.flax import layer


class MoE(nnx.Module):
    """Routed experts sharded over the EP mesh axis, plus an optional shared expert.

    `__call__(x: f[..., H]) -> (y: f[..., H], aux)`, aux as `jep.moe` returns it
    (load_balancing_loss, router_z_loss, tokens_per_expert, num_dropped). Each `nnx.Param`
    carries its sharding (experts over `config.axis_name`, the rest replicated); built under
    `jax.set_mesh`, the parameters are created sharded.

    Args:
      hidden: H, model width.
      ffn: F, hidden width of each routed expert.
      config: `jep.MoEConfig`.
      rngs: `nnx.Rngs` for the initializers.
      shared_ffn: hidden width of the always-on shared expert; 0 for none.
      mesh: the mesh; default the one set with `jax.set_mesh` / `jax.sharding.use_mesh`.
      param_dtype: dtype of the expert weights (the router stays float32).
    """

    def __init__(self, hidden: int, ffn: int, *, config: MoEConfig, rngs: nnx.Rngs,
                 shared_ffn: int = 0, mesh=None, param_dtype=jnp.float32):
        self.config = config
        self.mesh = mesh
        self.params = nnx.Dict({
            name: nnx.Param(layer.init_sharded(spec, rngs.params(), param_dtype),
                            out_sharding=spec.sharding)
            for name, spec in layer.param_specs(hidden, ffn, shared_ffn, config).items()
        })

    def __call__(self, x):
        params = {name: p[...] for name, p in self.params.items()}
        return layer.apply(x, params, config=self.config, mesh=self.mesh)
