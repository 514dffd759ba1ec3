"""Grouped GEMM kernels: y[rows of group g] = x[rows of g] @ w[g], groups contiguous.

`grouped_matmul` is differentiable (`jax.custom_vjp`), all three products Pallas Mosaic GPU kernels
of `mgpu`: the forward, dx (the same kernel reading w transposed) and dw[g] = x[rows of g]^T @
dy[rows of g] (`mgpu.grouped_matmul_dw`, the group's rows as the contraction).
`grouped_matmul_weights` is the products of one x with several weights (gate and up), whose dx
is one kernel summing them (`mgpu.grouped_matmul_sum`). `grouped_matmul_gated` is act(x @
w_gate) * (x @ w_up) with both products and the activation in one kernel
(`mgpu.grouped_matmul_gated`), and the backward of `grouped_matmul_weights`.

`grouped_matmul_fp8` is the FP8 product (e4m3 operands with per-tile scales, not differentiable
on its own: `jep.experts.fp8_grouped_matmul` makes it the forward and dx of one; given several
pairs of operands, the sum of their products), `grouped_matmul_fp8_gated` the gate and up FP8
products and the activation in one kernel, and
`grouped_matmul_dw_fp8` the FP8 weight gradient (`dw_fp8`, operands quantized along the rows:
that product's dw).

Each product runs with its own configuration, looked up by shape in the tuning table (`tuning`)
unless one is given: a `Config` for the forward and dx, a `DwConfig` (its own dimensions: K
blocks, N blocks, rows a step) for dw. Runs on Hopper GPUs (`interpret=True`: Pallas's GPU
interpret mode, on the CPU, for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jep_kernels.grouped_matmul import dw_fp8, mgpu, tuning
from jep_kernels.grouped_matmul.mgpu import SCOPES, Config, DwConfig, check_shapes
from jep_kernels.vma import vary_like

__all__ = ["Config", "Configs", "DwConfig", "SCOPES", "SHAPE_MULTIPLE", "check_shapes",
           "configs_for", "grouped_matmul", "grouped_matmul_chunks", "grouped_matmul_dw_fp8",
           "grouped_matmul_fp8", "grouped_matmul_fp8_gated",
           "grouped_matmul_gated", "grouped_matmul_weights"]


ROW_TILE = 8  # TMA wants the row count of an array a multiple of this
SHAPE_MULTIPLE = 128  # the default configurations take every K and N that are multiples of this


def _pad_rows(a):
    extra = -a.shape[0] % ROW_TILE
    return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def _product(xs, ws, group_sizes, *, transpose_w, config, interpret):
    """sum over i of xs[i] @ ws[i] (w transposed where `transpose_w`): one product, or with
    several pairs the summing kernel (`mgpu.grouped_matmul_sum`)."""
    with jax.named_scope(SCOPES["dx" if transpose_w else "forward"]):
        if transpose_w and interpret:
            # The interpreter has no transposed shared-memory views: transpose in memory instead.
            ws, transpose_w = [jnp.swapaxes(w, 1, 2) for w in ws], False
        y = mgpu.grouped_matmul_sum([_pad_rows(x) for x in xs], ws, group_sizes,
                                    transpose_w=transpose_w, config=config, interpret=interpret)
        return vary_like(y[:xs[0].shape[0]], *xs, *ws, group_sizes)


def _weight_gradient(x, dy, group_sizes, *, config, out_dtype, interpret, chunk_rows=None):
    with jax.named_scope(SCOPES["dw"]):
        dw = mgpu.grouped_matmul_dw(_pad_rows(x), _pad_rows(dy), group_sizes, config=config,
                                    out_dtype=out_dtype, chunk_rows=chunk_rows,
                                    interpret=interpret)
        return vary_like(dw, x, dy, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul_chunks(xs, ws, group_sizes, configs, interpret):
    """ys[j][c] = xs[c] @ ws[j] for each weight j and chunk c."""
    return tuple(tuple(_product([x], [w], sizes, transpose_w=False, config=configs["forward"],
                                interpret=interpret) for x, sizes in zip(xs, group_sizes))
                 for w in ws)


def _chunks_fwd(xs, ws, group_sizes, configs, interpret):
    return _grouped_matmul_chunks(xs, ws, group_sizes, configs, interpret), (xs, ws, group_sizes)


def _chunks_bwd(configs, interpret, residuals, dys):
    xs, ws, group_sizes = residuals
    dys = tuple(tuple(dy.astype(x.dtype) for x, dy in zip(xs, each)) for each in dys)
    def chunk_dx(c, sizes):
        chunk_dys = [each[c] for each in dys]
        if len(ws) > 1 and configs.dx_sum is not None:  # every weight's in one kernel
            return _product(chunk_dys, ws, sizes, transpose_w=True, config=configs.dx_sum,
                            interpret=interpret)
        return functools.reduce(jnp.add, (
            _product([dy], [w], sizes, transpose_w=True, config=configs["dx"],
                     interpret=interpret) for dy, w in zip(chunk_dys, ws)))

    dxs = tuple(chunk_dx(c, sizes) for c, sizes in enumerate(group_sizes))
    # One weight gradient over the rows of every chunk: each group's rows are its rows of
    # each chunk in turn, summed in one accumulator.
    dws = tuple(vary_like(_weight_gradient(
        jnp.concatenate(xs), jnp.concatenate(each), jnp.stack(group_sizes), config=configs["dw"],
        out_dtype=w.dtype, interpret=interpret, chunk_rows=tuple(x.shape[0] for x in xs)), w)
        for w, each in zip(ws, dys))
    return dxs, dws, None


_grouped_matmul_chunks.defvjp(_chunks_fwd, _chunks_bwd)

# The experts' activations (`jep.experts.ACTIVATION_FNS` is this), as `grouped_matmul_gated`'s
# kernel computes them (`mgpu.GATED_ACTIVATIONS`): its backward takes their gradients.
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def _gated(x, ws, group_sizes, *, activation, config, interpret):
    """(h, gate, up) of one chunk, each [M_c, N] (`mgpu.grouped_matmul_gated`)."""
    with jax.named_scope(SCOPES["forward"]):
        outs = mgpu.grouped_matmul_gated(_pad_rows(x), *ws, group_sizes, activation=activation,
                                         config=config, interpret=interpret)
        return tuple(vary_like(out[:x.shape[0]], x, *ws, group_sizes) for out in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gated_chunks(xs, ws, group_sizes, activation, config, configs, interpret):
    """hs[c] = act(xs[c] @ ws[0]) * (xs[c] @ ws[1]) for each chunk c."""
    return _gated_chunks_fwd(xs, ws, group_sizes, activation, config, configs, interpret)[0]


def _gated_chunks_fwd(xs, ws, group_sizes, activation, config, configs, interpret):
    outs = [_gated(x, ws, sizes, activation=activation, config=config, interpret=interpret)
            for x, sizes in zip(xs, group_sizes)]
    hs, gates, ups = (tuple(out[i] for out in outs) for i in range(3))
    return hs, (xs, ws, group_sizes, gates, ups)


def _gated_chunks_bwd(activation, config, configs, interpret, residuals, dhs):
    xs, ws, group_sizes, gates, ups = residuals
    act = ACTIVATIONS[activation]
    dgates, dups = [], []
    for x, gate, up, dh in zip(xs, gates, ups, dhs):  # the activation's gradient, by XLA
        _, vjp = jax.vjp(lambda g, u: act(g) * u, gate.astype(jnp.float32),
                         up.astype(jnp.float32))
        dgate, dup = vjp(dh.astype(jnp.float32))
        dgates.append(dgate.astype(x.dtype))
        dups.append(dup.astype(x.dtype))
    # Then the two products' backward: each chunk's dx in one summing kernel, each weight's
    # gradient once over every chunk.
    return _chunks_bwd(configs, interpret, (xs, ws, group_sizes), (tuple(dgates), tuple(dups)))


_gated_chunks.defvjp(_gated_chunks_fwd, _gated_chunks_bwd)


@dataclasses.dataclass(frozen=True)
class Configs:
    """The tile configurations of the three products of one grouped matmul: frozen and hashable
    (a `custom_vjp` static argument); `configs["dw"]` reads one by its op name."""

    forward: Config
    dx: Config
    dw: DwConfig
    # The dx of several weights of w's shape summed in one kernel (`grouped_matmul_weights`);
    # None: a dx kernel a weight, summed by XLA.
    dx_sum: Config | None = None

    def __getitem__(self, op: str) -> Config | DwConfig:
        if op not in tuning.OPS:
            raise KeyError(f"op must be one of {tuning.OPS}, got {op!r}")
        return getattr(self, op)


def configs_for(w_shape, config: Config | None = None,
                dw_config: DwConfig | None = None) -> Configs:
    """The `Configs` for a w of `w_shape` ([G, K, N]): `config` for the forward and dx and
    `dw_config` for dw where given, else each product's entry of the tuning table."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a Config (the forward's and dx's tiles), got "
                        f"{type(config).__name__}")
    if dw_config is not None and not isinstance(dw_config, DwConfig):
        raise TypeError(f"dw_config must be a DwConfig (the weight gradient's tiles), got "
                        f"{type(dw_config).__name__}")
    groups, k, n = w_shape
    given = {"forward": config, "dx": config, "dw": dw_config}
    chosen = {op: given[op] or tuning.config_for(op, *tuning.product_shape(op, k, n), groups)
              for op in tuning.OPS}
    dx_k, dx_n = tuning.product_shape(tuning.DX_SUM, k, n)
    dx_sum = (tuning.summing(config, dx_k, dx_n) if config is not None else
              tuning.entry_for(tuning.DX_SUM, dx_k, dx_n, groups))
    return Configs(**chosen, dx_sum=dx_sum)


def _checked_configs(xs, w, group_sizes, config, dw_config, summed: bool) -> Configs:
    """`configs_for(w.shape, config, dw_config)`, after checking each x and its group sizes
    against the forward's tiles and w's K and N against the tiles of dx (`summed`: of the
    summed dx too) and dw."""
    if w.ndim != 3:
        raise ValueError(f"w must be [G, K, N], got {w.shape}")
    configs = configs_for(w.shape, config, dw_config)
    for x, sizes in zip(xs, group_sizes):
        check_shapes(x, w, sizes, transpose_w=False, config=configs["forward"])
    k, n = w.shape[1:]
    dx, dw = configs["dx"], configs["dw"]
    dx_tile_n = dx.block_n * (2 if dx.warp_specialized else 1)
    if n % dx.block_k or k % dx_tile_n:
        raise ValueError(f"N={n} must be a multiple of block_k={dx.block_k} and K={k} of the tile "
                         f"width {dx_tile_n} (the tiles of dx = dy @ w^T)")
    dx_sum = configs.dx_sum
    if summed and dx_sum and (n % dx_sum.block_k or k % (2 * dx_sum.block_n)):
        raise ValueError(f"N={n} must be a multiple of block_k={dx_sum.block_k} and K={k} of "
                         f"the tile width {2 * dx_sum.block_n} (the tiles of the summed dx)")
    if k % dw.block_k or n % mgpu.dw_tile_n(dw):
        raise ValueError(f"K={k} must be a multiple of the dw_config's block_k={dw.block_k} and "
                         f"N={n} of its tile width {mgpu.dw_tile_n(dw)} (the tiles of the weight "
                         "gradient)")
    return configs


def grouped_matmul(x, w, group_sizes, *, config: Config | None = None,
                   dw_config: DwConfig | None = None, interpret: bool = False):
    """y[M, N] = x[rows of g] @ w[g] for each group g; rows past sum(group_sizes) are zero.

    Args:
      x: bf16/f16 [M, K]; w: [G, K, N] of the same dtype; group_sizes: i32[G].
      config: tile sizes (`Config`) of the forward and dx; dw_config: of the weight gradient
        (`DwConfig`). By default each product's own from the tuning table. K and N must be
        multiples of the tiles.
      interpret: run in Pallas's GPU interpret mode (CPU, slow; for tests).
    """
    return grouped_matmul_chunks([x], w, [group_sizes], config=config, dw_config=dw_config,
                                 interpret=interpret)[0]


def grouped_matmul_chunks(xs, w, group_sizes, *, config: Config | None = None,
                          dw_config: DwConfig | None = None, interpret: bool = False):
    """`grouped_matmul(xs[c], w, group_sizes[c])` for each chunk c of a layer run in chunks, as a
    tuple, with one weight gradient for all of them: dw is computed once, over the rows of
    every chunk (one kernel writing each gradient once, whatever the number of chunks), where
    a product per chunk would compute and write it once per chunk and then sum them.
    `grouped_matmul` is the case of one chunk.

    Args:
      xs: C arrays bf16/f16 [M_c, K], each grouped by its own group sizes.
      w: [G, K, N]; group_sizes: C arrays i32[G].
      config, dw_config, interpret: as for `grouped_matmul`.
    """
    return grouped_matmul_weights(xs, [w], group_sizes, config=config, dw_config=dw_config,
                                  interpret=interpret)[0]


def grouped_matmul_weights(xs, ws, group_sizes, *, config: Config | None = None,
                           dw_config: DwConfig | None = None, interpret: bool = False):
    """The products of the same rows with several weights of one shape (a SwiGLU expert's gate
    and up): ys[j][c] = `grouped_matmul(xs[c], ws[j], group_sizes[c])`, as a tuple (weights) of
    tuples (chunks). The forward is one kernel a product; in the backward each chunk's dx,
    sum over j of dy[j][c] @ ws[j]^T, is one kernel (`mgpu.grouped_matmul_sum`) that writes it
    once, and each weight's gradient is computed once over every chunk's rows.

    Args:
      xs: C arrays bf16/f16 [M_c, K], each grouped by its own group sizes.
      ws: P arrays [G, K, N] of x's dtype; group_sizes: C arrays i32[G].
      config, dw_config, interpret: as for `grouped_matmul`; the summed dx takes `config` made
        to sum (`tuning.summing`) where given, else the tuning table's "dx_sum" entry; where
        neither is, each chunk's dx is a dx kernel a weight, summed by XLA.
    """
    xs, ws, group_sizes = tuple(xs), tuple(ws), tuple(group_sizes)
    if not xs or len(xs) != len(group_sizes):
        raise ValueError(f"xs and group_sizes must be as many chunks (at least one), got "
                         f"{len(xs)} and {len(group_sizes)}")
    if not ws or any(w.shape != ws[0].shape or w.dtype != ws[0].dtype for w in ws):
        raise ValueError(f"ws must be one or more weights of one shape and dtype, got "
                         f"{[(w.shape, str(w.dtype)) for w in ws]}")
    configs = _checked_configs(xs, ws[0], group_sizes, config, dw_config, len(ws) > 1)
    # Inside shard_map: give them all the same mesh-axis type, so that each result and cotangent
    # has one type; where w is replicated over an axis x varies over, the cast's transpose sums
    # dw over that axis.
    prepared = [vary_like(a, *xs, *ws, *group_sizes)
                for a in (*xs, *ws, *(s.astype(jnp.int32) for s in group_sizes))]
    num, num_ws = len(xs), len(ws)
    xs, ws = tuple(prepared[:num]), tuple(prepared[num:num + num_ws])
    group_sizes = tuple(prepared[num + num_ws:])
    return _grouped_matmul_chunks(xs, ws, group_sizes, configs, interpret)


def grouped_matmul_gated(xs, w_gate, w_up, group_sizes, *, activation: str = "silu",
                         config: Config | None = None, interpret: bool = False):
    """act(xs[c] @ w_gate[g]) * (xs[c] @ w_up[g]) for each chunk c, as a tuple: a gated
    (SwiGLU-style) expert's first half, each chunk's in one kernel (`mgpu.grouped_matmul_gated`:
    each step of x loaded once for both products, the activation applied in the epilogue to
    the float32 products, gate and up kept for the backward). The backward is
    `grouped_matmul_weights`' with the activation's gradient before it (by XLA): each chunk's
    dx one summing kernel, each weight's gradient once over every chunk's rows.

    Args:
      xs: C arrays bf16/f16 [M_c, K], each grouped by its own group sizes.
      w_gate, w_up: [G, K, N] of x's dtype; group_sizes: C arrays i32[G].
      activation: "silu", "gelu" (tanh approximation) or "relu".
      config: the gated kernel's tiles (warp-specialized, across tiles); by default the tuning
        table's "gated" entry for (K, N, G), else `tuning.default("gated", K, N)`. The backward's
        products take their table entries.
      interpret: Pallas's GPU interpret mode (CPU; tests).
    """
    xs, group_sizes = tuple(xs), tuple(group_sizes)
    if not xs or len(xs) != len(group_sizes):
        raise ValueError(f"xs and group_sizes must be as many chunks (at least one), got "
                         f"{len(xs)} and {len(group_sizes)}")
    # The activation and w_up are checked by `mgpu.grouped_matmul_gated` as the forward traces.
    configs = _checked_configs(xs, w_gate, group_sizes, None, None, True)
    if config is None:
        groups, k, n = w_gate.shape
        config = tuning.config_for(tuning.GATED, k, n, groups)
    prepared = [vary_like(a, *xs, w_gate, w_up, *group_sizes)
                for a in (*xs, w_gate, w_up, *(s.astype(jnp.int32) for s in group_sizes))]
    num = len(xs)
    return _gated_chunks(tuple(prepared[:num]), tuple(prepared[num:num + 2]),
                         tuple(prepared[num + 2:]), activation, config, configs, interpret)


def grouped_matmul_fp8(x, x_scales, w, w_scales, group_sizes, *, config: Config | None = None,
                       out_dtype=jnp.bfloat16, interpret: bool = False):
    """y[M, N] = rows of g of (x * x_scales) @ (w[g] * w_scales[g])^T in e4m3 (DeepSeek-V3's FP8
    recipe): `mgpu.grouped_matmul_fp8`, not differentiable (`jep.experts.fp8_grouped_matmul`
    is, with this as its forward and dx on Hopper). With sequences of one length for x,
    x_scales, w and w_scales: the sum of their products, in one kernel that writes y once (the
    gate and up products' dx).

    Args:
      x: e4m3[M, K], x_scales: f32[M, K / 128] (`jep.fp8.quantize_rows`).
      w: e4m3[G, N, K], K-major; w_scales: f32[G, N / 128, K / 128] (`jep.fp8.QuantizedWeight`'s
        q_t and scales_t for y = x @ v[g], its q and scales for dy @ v[g]^T).
      group_sizes: i32[G]. config: the tiles (`Config`, block_k 128), by default the tuning
        table's "fp8" entry for (K, N, G) (of the first product, made to sum by
        `tuning.summing` for a sum). K and N must be multiples of 128.
    """
    xs, x_scales, ws, w_scales = (list(part) for part in zip(*mgpu.fp8_pairs(
        x, x_scales, w, w_scales)))
    if ws[0].ndim != 3:
        raise ValueError(f"w must be [G, N, K], got {ws[0].shape}")
    if config is None:
        groups, n, k = ws[0].shape
        config = tuning.config_for(tuning.FP8, k, n, groups)
        if len(xs) > 1:
            config = tuning.summing(config, k, n)
    name = SCOPES["fp8"]
    with jax.named_scope(name):
        y = mgpu.grouped_matmul_fp8([_pad_rows(a) for a in xs], [_pad_rows(s) for s in x_scales],
                                    ws, w_scales, group_sizes.astype(jnp.int32), config=config,
                                    out_dtype=out_dtype, name=name, interpret=interpret)
        return vary_like(y[:xs[0].shape[0]], *xs, *ws, group_sizes)


def grouped_matmul_fp8_gated(x, x_scales, w_gate, w_gate_scales, w_up, w_up_scales,
                             group_sizes, *, activation: str = "silu",
                             config: Config | None = None, out_dtype=jnp.bfloat16,
                             interpret: bool = False):
    """(h, gate, up) [M, N] in `out_dtype`: the FP8 products of x with w_gate and w_up (as
    `grouped_matmul_fp8`'s) and h = act(gate) * up, in one kernel (`mgpu.grouped_matmul_fp8_gated`:
    each step of x loaded once for both), not differentiable (`jep.experts`' FP8 SwiGLU half
    takes it on Hopper where the tuning table has its "fp8_gated" entry).

    Args:
      x: e4m3[M, K], x_scales: f32[M, K / 128]; w_gate, w_up: e4m3[G, N, K] and their scales
        f32[G, N / 128, K / 128] (`jep.fp8.QuantizedWeight`'s q_t and scales_t of each).
      group_sizes: i32[G]. activation: "silu", "gelu" (tanh approximation) or "relu".
      config: the tiles (across tiles), by default the table's "fp8_gated" entry for
        (K, N, G), else `tuning.default("fp8_gated", K, N)`.
    """
    if w_gate.ndim != 3:
        raise ValueError(f"w_gate must be [G, N, K], got {w_gate.shape}")
    if config is None:
        groups, n, k = w_gate.shape
        config = tuning.config_for(tuning.FP8_GATED, k, n, groups)
    name = SCOPES["fp8"]
    with jax.named_scope(name):
        outs = mgpu.grouped_matmul_fp8_gated(
            _pad_rows(x), _pad_rows(x_scales), w_gate, w_gate_scales, w_up, w_up_scales,
            group_sizes.astype(jnp.int32), activation=activation, config=config,
            out_dtype=out_dtype, name=name, interpret=interpret)
        return tuple(vary_like(out[:x.shape[0]], x, w_gate, w_up, group_sizes) for out in outs)


def grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, group_sizes, *, num_rows: int,
                          config: DwConfig | None = None, out_dtype=jnp.float32,
                          interpret: bool = False):
    """dw[G, K, N]: dw[g] = x[rows of g]^T @ dy[rows of g] from e4m3 operands quantized along
    the rows (`jep.fp8.quantize_columns`): `dw_fp8.grouped_matmul_dw_fp8`, not differentiable
    (`jep.experts.fp8_grouped_matmul`'s weight gradient on Hopper). With sequences of one
    length for dy_t and dy_scales, a tuple: the weight gradients of the same x in one kernel
    (the gate and up projections').

    Args:
      x_t: e4m3[K, P], x_scales: f32[P / 128, K]; dy_t: e4m3[N, P], dy_scales: f32[P / 128, N]
        (`quantize_columns` of x [M, K] and dy [M, N] by group_sizes i32[G]).
      num_rows: M. config: the tiles (a `DwConfig`, block_rows 128), by default the tuning
        table's "dw_fp8" entry for (K, N, G) ("dw_fp8_pair" for two dy), else
        `tuning.default` of it. K must be a multiple of block_k, N of block_n (128 each by
        default).
    """
    several = isinstance(dy_t, (list, tuple))
    dys = tuple(dy_t) if several else (dy_t,)
    if x_t.ndim != 2 or not dys or any(dy.ndim != 2 for dy in dys):
        raise ValueError(f"x_t must be [K, P] and dy_t [N, P] (or a sequence of them), got "
                         f"{x_t.shape} and {[dy.shape for dy in dys]}")
    op = tuning.DW_FP8_PAIR if len(dys) == 2 else tuning.DW_FP8
    config = config or tuning.config_for(op, x_t.shape[0], dys[0].shape[0],
                                         group_sizes.shape[0])
    with jax.named_scope(SCOPES["dw_fp8"]):
        dws = dw_fp8.grouped_matmul_dw_fp8(
            x_t, x_scales, list(dys), dy_scales if several else [dy_scales],
            group_sizes.astype(jnp.int32), num_rows=num_rows, config=config,
            out_dtype=out_dtype, interpret=interpret)
        dws = tuple(vary_like(dw, x_t, *dys, group_sizes) for dw in dws)
        return dws if several else dws[0]
