"""The MoE layer as a Flax NNX module, importable as Flax's own modules are:

    import jep.nnx
    from jep.nnx import MoE

The same objects as `jep.flax.nnx` (where they are defined, beside the linen module)."""

from jep.flax.nnx import ExpertPlacement, ExpertWeight, MoE, SelectionBias, replace_experts

__all__ = ["ExpertPlacement", "ExpertWeight", "MoE", "SelectionBias", "replace_experts"]
