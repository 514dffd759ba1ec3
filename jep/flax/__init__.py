"""Flax modules over `jep.moe`: `jep.flax.MoE` (linen) and `jep.nnx.MoE` (NNX)."""

from jep.flax import nnx
from jep.flax.linen import MoE, replace_experts

__all__ = ["MoE", "nnx", "replace_experts"]
