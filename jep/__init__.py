"""jep: expert parallelism for Mixture-of-Experts models in JAX."""

from jep.config import DispatchConfig, MoEConfig
from jep import balance, hierarchical, layout, low_latency, reference, transport
from jep.balance import update_bias
from jep.dispatch import DispatchHandle, combine, dispatch
from jep.experts import expert_ffn, grouped_matmul
from jep.moe import init_params, moe
from jep.routing import load_balancing_loss, route, router_scores, router_z_loss

__all__ = [
    "DispatchConfig", "DispatchHandle", "MoEConfig", "combine", "dispatch", "expert_ffn",
    "flax", "grouped_matmul", "hierarchical", "init_params", "layout", "low_latency", "moe",
    "nnx", "reference", "transport",
    "load_balancing_loss", "route", "router_scores", "router_z_loss", "balance", "update_bias",
]


# The Flax modules load on first use (`jep.flax`, `jep.nnx`, or `import jep.nnx`): `import jep`
# itself does not import flax.
_LAZY = ("flax", "nnx")


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"jep.{name}")
    raise AttributeError(f"module 'jep' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
