"""Grouped expert FFN (SwiGLU) on the rows `dispatch` delivered, one grouped matmul per weight.

Shapes: C rows, H hidden, F expert hidden, G = E_local groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import jep_kernels.grouped_matmul
import jep_kernels.grouped_matmul.reference
from jep import _checks
from jep.config import ACTIVATIONS
from jep.platform import current_platform, on_hopper

ACTIVATION_FNS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def _grouped_matmul_xla(x, w, group_sizes):
    # The product accumulates in float32 inside the kernel either way; asking for a float32
    # *result* would also make the backward products run in float32: 2-3x slower for bf16 on an
    # H200 (dx 53 against 97 TFLOP/s, dw 29 against 84; `python -m jep.bench gemm`).
    return lax.ragged_dot(x, w, group_sizes)


def _grouped_matmul_pallas(x, w, group_sizes):
    return jep_kernels.grouped_matmul.grouped_matmul(x, w, group_sizes)


def _pallas_takes(x, w) -> bool:
    """Whether the Pallas Mosaic GPU kernels run here and take these shapes: a Hopper GPU, bf16 or
    f16, K and N multiples of the kernel's 128-wide tiles."""
    tile = jep_kernels.grouped_matmul.SHAPE_MULTIPLE
    return (on_hopper() and x.dtype in (jnp.bfloat16, jnp.float16)
            and w.dtype == x.dtype and w.shape[1] % tile == 0 and w.shape[2] % tile == 0)


_BACKENDS = {"pallas": _grouped_matmul_pallas, "xla": _grouped_matmul_xla,
             "reference": jep_kernels.grouped_matmul.reference.grouped_matmul}


def grouped_matmul(x, w, group_sizes, *, backend: str = "auto"):
    """[C, N] in x.dtype, accumulated in float32 (float64 for float64 x): rows of group g times
    w[g]; rows past `sum(group_sizes)` give 0.

    Args:
      x: f[C, K], rows grouped contiguously, group 0 first.
      w: f[G, K, N].
      group_sizes: i32[G].
      backend: "auto" (the Pallas kernels where they run and take the shapes, else XLA's
        `lax.ragged_dot`), "pallas", "xla" or "reference".
    """
    return _BACKENDS[grouped_matmul_backend(x, w, backend)](x, w, group_sizes)


def grouped_matmul_backend(x, w, backend: str = "auto") -> str:
    """The backend `grouped_matmul(x, w, ..., backend=backend)` runs: `backend` itself, or for
    "auto" "pallas" where the kernels run and take the shapes, else "xla". Raises ValueError for
    an unknown backend, or "pallas" where it cannot run."""
    if backend == "auto":
        return "pallas" if _pallas_takes(x, w) else "xla"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(_BACKENDS)}, got {backend!r}")
    if backend == "pallas" and not _pallas_takes(x, w):
        raise ValueError(
            "backend='pallas' (jep_kernels.grouped_matmul, Pallas Mosaic GPU) needs a Hopper GPU, "
            f"bf16 or f16 x and w, and K and N multiples of 128; got x {x.dtype}{list(x.shape)}, "
            f"w {w.dtype}{list(w.shape)} on {current_platform()!r}. Use 'xla' or 'auto'.")
    return backend


def expert_ffn(recv_x, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
               backend: str = "auto"):
    """SwiGLU experts over grouped rows: `(act(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g]`.

    Args:
      recv_x: f[C, H], the rows of local expert 0, then 1, ... (`jep.dispatch`'s output).
      group_sizes: i32[G], rows per expert; rows past their sum give zero.
      w_gate, w_up: f[G, H, F]; w_down: f[G, F, H].
      activation: "silu" (SwiGLU), "gelu" or "relu".
      backend: grouped-matmul backend, "auto", "pallas" (Hopper), "xla" (`lax.ragged_dot`) or
        "reference".

    Returns:
      [C, H] in recv_x.dtype; products accumulate in float32.
    """
    _check_args(recv_x, group_sizes, w_gate, w_up, w_down, activation)
    matmul = functools.partial(grouped_matmul, group_sizes=group_sizes, backend=backend)
    return _swiglu(matmul, recv_x, w_gate, w_up, w_down, activation)


def _check_args(recv_x, group_sizes, w_gate, w_up, w_down, activation):
    _checks.rank(recv_x, 2, "recv_x")
    _checks.floating(recv_x, "recv_x")
    _checks.rank(group_sizes, 1, "group_sizes")
    _checks.integer(group_sizes, "group_sizes")
    num_groups, hidden = group_sizes.shape[0], recv_x.shape[1]
    _checks.rank(w_gate, 3, "w_gate")
    ffn = w_gate.shape[2]
    _checks.shape(w_gate, (num_groups, hidden, ffn), "w_gate")
    _checks.shape(w_up, (num_groups, hidden, ffn), "w_up")
    _checks.shape(w_down, (num_groups, ffn, hidden), "w_down")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _swiglu(matmul, rows, w_gate, w_up, w_down, activation):
    """`(act(rows @ w_gate) * (rows @ w_up)) @ w_down` with `matmul(rows, w)` the grouped product;
    `rows` an array, or a tuple of arrays (chunks) for a `matmul` that takes them."""
    act = ACTIVATION_FNS[activation]
    first = rows[0] if isinstance(rows, tuple) else rows
    dtype, accumulator = first.dtype, jep_kernels.grouped_matmul.reference.accumulator(first)
    gate = matmul(rows, w_gate.astype(dtype))
    up = matmul(rows, w_up.astype(dtype))
    hidden = jax.tree.map(
        lambda g, u: (act(g.astype(accumulator)) * u.astype(accumulator)).astype(dtype), gate, up)
    return matmul(hidden, w_down.astype(dtype))


def expert_ffn_chunks(recv_xs, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
                      backend: str = "auto"):
    """`expert_ffn` of each chunk of a layer run in chunks (`DispatchConfig(num_chunks)`): a
    tuple of [C_c, H], chunk c's rows recv_xs[c] grouped by group_sizes[c].

    With the Pallas kernels, each weight's gradient is computed once over the rows of every
    chunk (`jep_kernels.grouped_matmul.grouped_matmul_chunks`), not once per chunk and summed:
    chunking does not multiply the weight-gradient work. Elsewhere, one `expert_ffn` a chunk.
    """
    recv_xs, group_sizes = tuple(recv_xs), tuple(group_sizes)
    if not recv_xs or len(recv_xs) != len(group_sizes):
        raise ValueError(f"recv_xs and group_sizes must be as many chunks (at least one), got "
                         f"{len(recv_xs)} and {len(group_sizes)}")
    for x, sizes in zip(recv_xs, group_sizes):
        _check_args(x, sizes, w_gate, w_up, w_down, activation)
    if grouped_matmul_backend(recv_xs[0], w_gate.astype(recv_xs[0].dtype), backend) != "pallas":
        return tuple(expert_ffn(x, sizes, w_gate, w_up, w_down, activation=activation,
                                backend=backend) for x, sizes in zip(recv_xs, group_sizes))

    def matmul(rows, w):
        return jep_kernels.grouped_matmul.grouped_matmul_chunks(rows, w, group_sizes)

    return _swiglu(matmul, recv_xs, w_gate, w_up, w_down, activation)
