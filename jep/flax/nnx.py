"""`jep.nnx.MoE`: the MoE layer as a Flax NNX module."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jep.balance import update_bias
from jep.config import MoEConfig
from jep.flax import layer


class SelectionBias(nnx.Variable):
    """The aux-loss-free selection bias, f32[E]: the layer's state, not a trainable parameter
    (an optimizer over `nnx.Param` leaves it alone)."""


class MoE(nnx.Module):
    """Routed experts sharded over the EP mesh axis, plus an optional shared expert.

    `__call__(x: f[..., H]) -> (y: f[..., H], aux)`, aux as `jep.moe` returns it (balancing
    losses, tokens_per_expert, imbalance, num_dropped, num_rerouted). Each `nnx.Param` carries
    its sharding (experts over `config.axis_name`, the rest replicated); built under
    `jax.set_mesh`, the parameters are created sharded.

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
      mesh: the mesh; default the one set with `jax.set_mesh` / `jax.sharding.use_mesh`.
      param_dtype: dtype of the expert weights (the router stays float32).
      bias_rate: step of the selection-bias rule; 0 (default): no bias.
    """

    def __init__(self, hidden: int, ffn: int, *, config: MoEConfig, rngs: nnx.Rngs,
                 shared_ffn: int = 0, mesh=None, param_dtype=jnp.float32, bias_rate: float = 0.0):
        if not bias_rate >= 0:
            raise ValueError(f"bias_rate must be >= 0, got {bias_rate!r}")
        self.config = config
        self.mesh = mesh
        self.bias_rate = bias_rate
        self.deterministic = False
        if bias_rate > 0:
            self.bias = SelectionBias(jnp.zeros((config.num_experts,), jnp.float32))
        self.params = nnx.Dict({
            name: nnx.Param(layer.init_sharded(spec, rngs.params(), param_dtype),
                            out_sharding=spec.sharding)
            for name, spec in layer.param_specs(hidden, ffn, shared_ffn, config).items()
        })

    def __call__(self, x):
        params = {name: p[...] for name, p in self.params.items()}
        if self.bias_rate > 0:
            params["bias"] = self.bias[...]
        y, aux = layer.apply(x, params, config=self.config, mesh=self.mesh)
        if self.bias_rate > 0 and not self.deterministic:
            self.bias[...] = update_bias(self.bias[...], aux["tokens_per_expert"],
                                         rate=self.bias_rate)
        return y, aux
