"""Frozen configuration of the MoE layer and of its dispatch.

Both are plain hashable dataclasses, so they can be passed as static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

from jep_kernels.ragged_a2a import check_timeout

SCORES = ("softmax", "sigmoid")
OVERFLOW = ("position", "probability", "reroute")
ACTIVATIONS = ("silu", "gelu", "relu")
PERMUTES = ("auto", "pallas", "xla")
MODES = ("flat", "hierarchical", "low_latency")
PRECISIONS = ("bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How tokens travel to their experts.

    Attributes:
      capacity: rows kept per local expert (GShard's meaning); `None` is dropless.
      capacity_factor: alternative to `capacity`: `ceil(capacity_factor * T * k / E_local)` rows
        per local expert, T being the tokens of one rank (what each expert gets under perfect
        balance, times the factor). At most one of `capacity` and `capacity_factor` is set.
      overflow: what happens to pairs a full expert cannot take (with a capacity only; see
        `jep.balance`): "position" drops the latest by position, "probability" drops those of
        lowest router weight, "reroute" moves them to their token's next-best expert with room.
      backend: the transport, `"auto"` or a name registered in `jep.transport`.
      permute: the row mover of the local expansion and of combine's sums, "auto" (the Pallas
        kernels on Hopper GPUs), "pallas" or "xla" (`jep.dispatch`).
      mode: "flat", "hierarchical" (two EP axes, (node, local): each token crosses the node
        axis once per node; `jep.hierarchical`) or "low_latency" (decoding: one custom call each
        way, no host waiting, forward only; `jep.low_latency`; the transport is its own).
      num_chunks: split each rank's tokens into this many chunks and run route -> dispatch ->
        experts -> combine for each: the chunks do not depend on each other, so XLA's scheduler
        can run one chunk's dispatch or combine (asynchronous collectives) while another
        chunk's experts compute. Results equal one chunk's, dropless; a capacity (and the
        overflow policy) applies to each chunk, `capacity_factor` to its tokens. Each chunk's
        expert products (forward and dx) read all of the rank's expert weights again, and
        where an expert gets about 128 rows a step or fewer those reads bound the products:
        on one H200 a DeepSeek-V3 layer of 4096 tokens at EP=1 (no exchange to hide) took 39
        and 65 ms a step in 2 and 4 chunks against 25 in one. Chunks pay where the exchanges
        they hide cost more than the extra weight reads.
      timeout_s: seconds a device waits for its peers in the `ffi` transport and the
        low-latency calls before the program fails naming the ranks that never came; None:
        the variable `JEP_FFI_TIMEOUT_S`, else 60. It is read when the layer is traced and
        belongs to the compiled program (a new value is a new config, so a new trace).
      fp8: tokens travel as e4m3 with a float32 scale per 128 channels (DeepSeek-V3's FP8
        dispatch, `jep.fp8`), dequantized on arrival (in hierarchical mode after the second
        hop); combine stays in the tokens' dtype. H a multiple of 128.
      check_ids: expert ids >= E (a routing bug; always counted) an error under
        `jax.experimental.checkify.checkify` (`jep.dispatch`'s `check_ids`). Off by default: the
        check keeps every call of the jitted step off jax's fast dispatch path.
    """

    capacity: int | None = None
    capacity_factor: float | None = None
    overflow: str = "position"
    backend: str = "auto"
    permute: str = "auto"
    mode: str = "flat"
    num_chunks: int = 1
    timeout_s: float | None = None
    fp8: bool = False
    check_ids: bool = False

    def __post_init__(self):
        if self.capacity is not None and self.capacity_factor is not None:
            raise ValueError("DispatchConfig: set at most one of capacity and capacity_factor")
        if self.capacity is not None and (not isinstance(self.capacity, int) or self.capacity < 0):
            raise ValueError(f"DispatchConfig.capacity must be an int >= 0 or None, got {self.capacity!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"DispatchConfig.capacity_factor must be > 0 or None, got {self.capacity_factor!r}")
        if self.overflow not in OVERFLOW:
            raise ValueError(f"DispatchConfig.overflow must be one of {OVERFLOW}, got {self.overflow!r}")
        if self.permute not in PERMUTES:
            raise ValueError(f"DispatchConfig.permute must be one of {PERMUTES}, got {self.permute!r}")
        if self.mode not in MODES:
            raise ValueError(f"DispatchConfig.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or self.num_chunks < 1:
            raise ValueError(f"DispatchConfig.num_chunks must be an int >= 1, got {self.num_chunks!r}")
        if self.timeout_s is not None:
            check_timeout(self.timeout_s, "DispatchConfig.timeout_s")
        if not isinstance(self.fp8, bool):
            raise TypeError(f"DispatchConfig.fp8 must be a bool, got {self.fp8!r}")
        if not isinstance(self.check_ids, bool):
            raise TypeError(f"DispatchConfig.check_ids must be a bool, got {self.check_ids!r}")

    def capacity_for(self, num_tokens: int, top_k: int, num_local_experts: int) -> int | None:
        """The per-local-expert capacity for `num_tokens` tokens per rank, or None (dropless)."""
        if self.capacity_factor is None:
            return self.capacity
        return math.ceil(self.capacity_factor * num_tokens * top_k / num_local_experts)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The routed-expert MoE layer.

    Attributes:
      num_experts: E, experts in total; must be divisible by the size of the `axis_name` mesh axis.
      top_k: k, experts per token.
      score: "softmax" or "sigmoid" router scores.
      num_groups, topk_groups: DeepSeek-V3 group-limited routing (both or neither).
      renormalize: divide each token's k weights by their sum.
      routed_scaling_factor: multiplies the routing weights (DeepSeek-V3 uses 2.5).
      activation: gate activation of the SwiGLU experts ("silu", "gelu" or "relu").
      axis_name: the mesh axis experts are sharded over (EP), or a tuple of axes, e.g. ("node",
        "local"), whose devices together are the EP ranks (numbered in the tuple's order).
      dispatch: capacity and transport, see `DispatchConfig`.
      expert_backend: the grouped-matmul backend of `jep.expert_ffn`.
      expert_precision: "bf16": the expert products in the tokens' dtype (bf16 in training;
        float32 tokens keep float32); "fp8": DeepSeek-V3's FP8 recipe (`jep.expert_ffn`'s
        `precision`): each product's input quantized to e4m3 per 1 x 128 tile and each weight
        per 128 x 128 block, once per step, the weight gradients' operands along the rows (a
        scale per 128 rows of one expert x 1 channel), the master weights kept in their dtype.
        H and F must be multiples of 128. FP8 tensor-core kernels on Hopper (bf16, f16 or
        float32 tokens); elsewhere emulated (exact FP8 values, float32 products): the
        numerics of FP8, not its speed.
    """

    num_experts: int
    top_k: int
    score: str = "softmax"
    num_groups: int | None = None
    topk_groups: int | None = None
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    activation: str = "silu"
    axis_name: str | tuple[str, ...] = "ep"
    dispatch: DispatchConfig = DispatchConfig()
    expert_backend: str = "auto"
    expert_precision: str = "bf16"

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts must be an int >= 1, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be an int in [1, num_experts={self.num_experts}], "
                f"got {self.top_k!r}")
        if self.score not in SCORES:
            raise ValueError(f"MoEConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.expert_precision not in PRECISIONS:
            raise ValueError(f"MoEConfig.expert_precision must be one of {PRECISIONS}, got "
                             f"{self.expert_precision!r}")
        if not isinstance(self.dispatch, DispatchConfig):
            raise TypeError(f"MoEConfig.dispatch must be a DispatchConfig, got {type(self.dispatch)}")
        if not (isinstance(self.axis_name, str) or (
                isinstance(self.axis_name, tuple) and self.axis_name
                and all(isinstance(a, str) for a in self.axis_name))):
            raise TypeError(f"MoEConfig.axis_name must be a mesh axis name or a tuple of them, "
                            f"got {self.axis_name!r}")
        if self.dispatch.mode == "hierarchical" and len(self.ep_axes) != 2:
            raise ValueError("DispatchConfig(mode='hierarchical') needs MoEConfig.axis_name = "
                             f"(node axis, local axis), got {self.axis_name!r}")

    @property
    def ep_axes(self) -> tuple[str, ...]:
        """The EP mesh axes, as a tuple."""
        return self.axis_name if isinstance(self.axis_name, tuple) else (self.axis_name,)

    def ep_size(self, mesh) -> int:
        """The number of EP ranks in `mesh`: the product of the sizes of `ep_axes`."""
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        if any(a not in sizes for a in self.ep_axes):
            raise ValueError(
                f"config.axis_name={self.axis_name!r} is not an axis of the mesh {mesh.axis_names}")
        return math.prod(sizes[a] for a in self.ep_axes)
