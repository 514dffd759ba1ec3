"""Which kernel configuration each grouped-GEMM product runs with, by shape.

The three products of one grouped matmul y = x @ w[g] (x [M, K], w [G, K, N]) are tuned apart:

- "forward": y = x @ w[g], a [M, K] x [K, N] product;
- "dx": dx = dy @ w[g]^T, [M, N] x [N, K] (the forward kernel reading w transposed);
- "dw": dw[g] = x[rows of g]^T @ dy[rows of g], [K, M_g] x [M_g, N].

The FP8 kernel ("fp8", `grouped_matmul_fp8`) has entries of its own, keyed by its product's K
(the contraction) and N, and so has the FP8 weight gradient ("dw_fp8", `grouped_matmul_dw_fp8`,
keyed as "dw" is); so has the dx of several weights of one shape summed in one kernel
("dx_sum", `mgpu.grouped_matmul_sum`: the gate and up products' dx), keyed as "dx" is (one
product's K and N). `tune` writes a "dx_sum" entry only where its pick beat two dx kernels and
their sum, timed beside it; where the table has none, `grouped_matmul_weights` runs those.
Likewise "gated" (`mgpu.grouped_matmul_gated`: the gate and up products from one load of x,
act(gate) * up in the epilogue), keyed as "forward" is: written only where it beat the two
forward products and the activation timed beside it; where the table has none,
`grouped_matmul_gated` is not taken (`jep.experts` runs the products apart). "fp8_gated"
(`mgpu.grouped_matmul_fp8_gated`) is its FP8 counterpart, keyed as "fp8" is, against two FP8
products and the activation; "dw_fp8_pair" (`grouped_matmul_dw_fp8` of two dy: the gate and
up weight gradients from one load of x a step), keyed as "dw" is, against two "dw_fp8".

`table.json` (beside this file) holds the configuration a benchmark run picked for each measured
(op, K, N, G), K and N named as in the list above (`python -m jep.bench tune` writes a new one;
BENCHMARKS.md says how it was made). A shape whose (op, K, N) is in the table with another G
takes the entry of the nearest G (by ratio); other shapes get `default(op, K, N)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

from jep_kernels.grouped_matmul import dw_fp8, mgpu
from jep_kernels.grouped_matmul.mgpu import Config, DwConfig

OPS = ("forward", "dx", "dw")
FP8 = "fp8"  # the FP8 kernel (forward and dx alike: x [M, K] times w [G, N, K] transposed)
DW_FP8 = "dw_fp8"  # the FP8 weight gradient (`dw_fp8`: x and dy quantized along the rows)
DX_SUM = "dx_sum"  # dy_a @ w_a[g]^T + dy_b @ w_b[g]^T, ... in one kernel (`mgpu.grouped_matmul_sum`)
GATED = "gated"  # act(x @ w_gate[g]) * (x @ w_up[g]) in one kernel (`mgpu.grouped_matmul_gated`)
FP8_GATED = "fp8_gated"  # the same in FP8 (`mgpu.grouped_matmul_fp8_gated`)
DW_FP8_PAIR = "dw_fp8_pair"  # two FP8 weight gradients of one x in one kernel (gate's, up's)
TUNED = (*OPS, FP8, DW_FP8, DX_SUM, GATED, FP8_GATED, DW_FP8_PAIR)  # ops with table entries
TABLE = pathlib.Path(__file__).with_name("table.json")


def key(op: str, k: int, n: int, groups: int) -> str:
    return f"{op} K={k} N={n} G={groups}"


def default(op: str, k: int, n: int) -> Config | DwConfig:
    """A configuration that takes every K and N that are multiples of 128 (a `DwConfig` for
    "dw" and "dw_fp8")."""
    if op == "dw":
        return DwConfig(block_k=128, block_n=128, block_rows=64, max_concurrent_steps=4)
    if op == DW_FP8:
        return dw_fp8.DW_FP8_CONFIG
    if op == DW_FP8_PAIR:  # a stage holds x's step and both dy's (48 KB): three of them
        return dataclasses.replace(dw_fp8.DW_FP8_CONFIG, max_concurrent_steps=3)
    block_n = 128 if n % 256 == 0 else 64
    if op in (FP8, FP8_GATED):  # two warpgroups of 64 rows x 128 columns (gated: a ring of
        # 3 stages of x's step and both weights', 48 KB each)
        return Config(block_m=128, block_n=64, block_k=128,
                      max_concurrent_steps=3 if op == FP8_GATED else 4, warp_specialized=True,
                      split="m", across_tiles=op == FP8_GATED)
    if op == GATED:  # a stage holds a step of x and of both weights: 64 columns a warpgroup
        return Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=4,
                      warp_specialized=True, across_tiles=True)
    return Config(block_m=128, block_n=block_n, block_k=64, max_concurrent_steps=4,
                  warp_specialized=True, across_tiles=op == DX_SUM)


def summing(config: Config, k: int, n: int) -> Config:
    """A forward/dx `config` as the summing kernel (`mgpu.grouped_matmul_sum`) takes it: one
    ring of stages across tiles, no cluster; `default(DX_SUM, k, n)` for one that is not
    warp-specialized."""
    if not config.warp_specialized:
        return default(DX_SUM, k, n)
    return dataclasses.replace(config, across_tiles=True, cluster_n=1)


def config_class(op: str) -> type:
    """The configuration type of `op`: `DwConfig` for "dw" and "dw_fp8", `Config` for the
    others."""
    return DwConfig if op in ("dw", DW_FP8, DW_FP8_PAIR) else Config


@functools.cache
def _table(path: pathlib.Path = TABLE) -> dict[str, Config | DwConfig]:
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {name: config_class(name.split()[0])(**fields) for name, fields in entries.items()}


def entry_for(op: str, k: int, n: int, groups: int) -> Config | DwConfig | None:
    """The table's entry for this product and shape, or for its (op, K, N) at the nearest G;
    None where the table has no (op, K, N)."""
    if op not in TUNED:
        raise ValueError(f"op must be one of {TUNED}, got {op!r}")
    table = _table()
    if key(op, k, n, groups) in table:
        return table[key(op, k, n, groups)]
    prefix = key(op, k, n, 0)[:-1]
    near = [(abs(math.log(int(name[len(prefix):]) / max(groups, 1))), name)
            for name in table if name.startswith(prefix)]
    return table[min(near)[1]] if near else None


def config_for(op: str, k: int, n: int, groups: int) -> Config | DwConfig:
    """The tuned configuration for this product and shape (`entry_for`), else
    `default(op, k, n)`; for "dx_sum" else the "dx" configuration made to sum."""
    found = entry_for(op, k, n, groups)
    if found is not None:
        return found
    if op == DX_SUM:
        return summing(config_for("dx", k, n, groups), k, n)
    return default(op, k, n)


def product_shape(op: str, k: int, n: int) -> tuple[int, int]:
    """(K, N) of `op`'s own product, for a grouped matmul whose w is [G, k, n]."""
    return (n, k) if op in ("dx", DX_SUM) else (k, n)


def candidates(op: str, k: int, n: int) -> list[Config | DwConfig]:
    """The configurations a tuning run measures for `op` at this (product) K and N: the ones
    that take the shape."""
    if op == "dw":
        found = [DwConfig(block_k=bk, block_n=bn, block_rows=rows, max_concurrent_steps=steps)
                 for bk, bn, rows, steps in ((128, 128, 64, 4), (128, 128, 64, 5),
                                             (128, 128, 128, 3), (64, 128, 64, 4),
                                             (128, 64, 64, 4))]
        # Warp-specialized: block_n is each compute warpgroup's width (tiles of 2 block_n).
        # epilogue_k/n = block_k/n: the whole tile stored from one buffer; fewer: pieces in
        # two buffers.
        found += [DwConfig(block_k=bk, block_n=bn, block_rows=rows, max_concurrent_steps=steps,
                           warp_specialized=True, epilogue_k=ek, epilogue_n=en)
                  for bk, bn, rows, steps, ek, en in (
                      (128, 128, 64, 3, 64, 64), (128, 128, 64, 4, 64, 64),
                      (128, 64, 64, 6, 64, 64), (128, 128, 64, 3, 128, 128),
                      (128, 128, 64, 2, 128, 128), (128, 64, 64, 4, 128, 64),
                      (128, 64, 64, 6, 128, 64), (64, 128, 64, 4, 64, 128),
                      (128, 128, 64, 3, 64, 128))]
        # dy's rows held across a run of K tiles (`resident_steps`, `run_k_blocks`).
        found += [DwConfig(block_k=128, block_n=bn, block_rows=64, max_concurrent_steps=steps,
                           warp_specialized=True, epilogue_k=ek, epilogue_n=en,
                           resident_steps=resident, run_k_blocks=run)
                  for bn, steps, ek, en, resident, run in (
                      (128, 4, 64, 64, 3, 0), (128, 6, 64, 64, 3, 0), (128, 4, 64, 64, 3, 8),
                      (128, 5, 64, 64, 3, 8), (128, 4, 64, 64, 3, 4), (128, 4, 128, 128, 3, 0),
                      (128, 4, 128, 128, 3, 8), (128, 3, 64, 64, 4, 0),
                      (64, 4, 128, 64, 5, 0), (64, 6, 128, 64, 3, 0), (128, 4, 64, 128, 3, 8),
                      (128, 4, 64, 128, 3, 0))]
        return [c for c in found if k % (c.block_k * (c.run_k_blocks or 1)) == 0
                and n % mgpu.dw_tile_n(c) == 0]
    if op == DW_FP8:  # 128 rows a step (one scale tile); a warpgroup takes half of block_k
        found = [dataclasses.replace(dw_fp8.DW_FP8_CONFIG, block_k=bk, block_n=bn,
                                     max_concurrent_steps=steps, epilogue_n=en)
                 for bk, bn, steps, en in ((128, 128, 3, 64), (128, 128, 4, 64),
                                           (128, 128, 5, 64), (128, 128, 4, 128),
                                           (128, 64, 4, 64), (128, 64, 6, 64),
                                           (256, 64, 4, 64), (256, 64, 5, 64))]
        return [c for c in found if k % c.block_k == 0 and n % c.block_n == 0]
    if op == DW_FP8_PAIR:  # a stage: x's 128 rows of K and both dy's of N (48 KB at 128 x 128)
        found = [dataclasses.replace(dw_fp8.DW_FP8_CONFIG, block_k=bk, block_n=bn,
                                     max_concurrent_steps=steps)
                 for bk, bn, steps in ((128, 128, 2), (128, 128, 3), (128, 64, 3), (128, 64, 4),
                                       (256, 64, 3))]
        return [c for c in found if k % c.block_k == 0 and n % c.block_n == 0]
    if op == GATED:  # the ring, 64 columns of each weight a warpgroup (shared memory: a
        # stage of 128 rows is 48 KB, of 192 rows 56 KB, of 256 rows 64 KB)
        found = [Config(block_m=bm, block_n=64, block_k=64, max_concurrent_steps=steps,
                        warp_specialized=True, split=split, acc_rows=acc_rows, across_tiles=True)
                 for bm, steps, split, acc_rows in (
                     (128, 3, "n", 0), (128, 4, "n", 0), (128, 4, "n", 64), (192, 3, "n", 64),
                     (256, 3, "m", 64), (128, 4, "m", 0))]
        return [c for c in found if k % c.block_k == 0 and n % (2 * c.block_n) == 0]
    if op == FP8_GATED:  # the ring; a stage holds x's step and both weights' (48 KB)
        found = [Config(block_m=128, block_n=64, block_k=128, max_concurrent_steps=steps,
                        warp_specialized=True, split=split, across_tiles=True)
                 for steps, split in ((3, "m"), (4, "m"), (3, "n"))]
        return [c for c in found if n % (2 * c.block_n) == 0]
    if op == FP8:  # warp-specialized, 128 deep (one scale block a step)
        found = [Config(block_m=128, block_n=64, block_k=128, max_concurrent_steps=steps,
                        warp_specialized=True, split=split, band=band, swizzled_epilogue=swz)
                 for steps, split, band, swz in (
                     (4, "n", 1, False), (5, "n", 1, False), (4, "m", 1, False),
                     (5, "m", 1, False), (4, "m", 8, False), (4, "m", 1, True),
                     (5, "m", 8, False))]
        found += [dataclasses.replace(c, across_tiles=True) for c in found
                  if c.split == "m" and c.band == 1 and not c.swizzled_epilogue]
        # Blocks of 256 rows: each warpgroup's 128 in two sums of 64 promoted in turn through
        # one 64-row part (192 registers of float32), so that a step's w tile serves 256 rows:
        # 48 KB of loads a step for twice the products of 32 (reads through L2 and writes into
        # shared memory a quarter fewer a product). Three stages (four exceed shared memory).
        found += [Config(block_m=256, block_n=64, block_k=128, max_concurrent_steps=3,
                         warp_specialized=True, split="m", band=band, acc_rows=64,
                         across_tiles=across)
                  for band, across in ((1, False), (8, False), (1, True))]
        # Clusters of two blocks on neighbouring column tiles multicasting x's tile: a
        # block's reads through L2 a step go from 32 to 24 KB.
        found += [Config(block_m=128, block_n=64, block_k=128, max_concurrent_steps=steps,
                         warp_specialized=True, split=split, band=band, cluster_n=2)
                  for steps, split, band in ((4, "m", 1), (5, "m", 1), (4, "m", 8), (4, "n", 1))]
        return [c for c in found if n % (2 * c.block_n * c.cluster_n) == 0]
    found = [Config(block_m=bm, block_n=128, block_k=64, max_concurrent_steps=steps)
             for bm, steps in ((128, 4), (128, 5), (192, 4))]
    found += [Config(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps,
                     warp_specialized=True, cluster_n=cluster, split=split, band=band)
              for bm, bn, steps, cluster, split, band in (
                  (128, 128, 3, 1, "n", 1), (128, 128, 4, 1, "n", 1), (128, 64, 4, 1, "n", 1),
                  (128, 128, 3, 2, "n", 1), (128, 128, 4, 2, "n", 1), (128, 128, 4, 1, "m", 1),
                  (256, 64, 4, 1, "m", 1),
                  (128, 128, 3, 1, "n", 4), (128, 128, 3, 1, "n", 8), (128, 128, 4, 1, "n", 8),
                  (128, 128, 3, 1, "n", 16), (128, 128, 4, 2, "n", 8), (128, 128, 4, 1, "m", 8))]
    # Accumulators of 64 rows (`Config.acc_rows`): blocks of 256 rows split by rows, and of
    # 128 and 192 by columns (192: a group of up to about 185 rows in one block, and 96 KB of
    # weights in flight, three stages of 32 KB, where 256 x 64 tiles hold four of 16 KB).
    found += [Config(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps,
                     warp_specialized=True, split=split, band=band, acc_rows=64, cluster_n=cluster)
              for bm, bn, steps, split, band, cluster in (
                  (256, 64, 3, "m", 1, 1), (256, 64, 4, "m", 1, 1), (256, 64, 4, "m", 8, 1),
                  (256, 64, 4, "m", 1, 2), (128, 128, 3, "n", 1, 1), (128, 128, 4, "n", 1, 1),
                  (128, 128, 4, "n", 8, 1), (192, 128, 3, "n", 1, 1), (192, 128, 3, "n", 1, 2))]
    found += [dataclasses.replace(c, swizzled_epilogue=True) for c in found
              if c.warp_specialized and c.max_concurrent_steps == 3 and c.cluster_n == 1]
    # One ring of stages across a program's tiles (`Config.across_tiles`), for the
    # one-program-per-cluster-of-one candidates taken in item order.
    found += [dataclasses.replace(c, across_tiles=True) for c in found
              if c.warp_specialized and c.cluster_n == 1 and c.band == 1
              and not c.swizzled_epilogue]
    if op == DX_SUM:  # the ring's candidates only
        found = [c for c in found if c.across_tiles]
    tile_n = lambda c: c.block_n * (2 * c.cluster_n if c.warp_specialized else 1)  # noqa: E731
    return [c for c in found if k % c.block_k == 0 and n % tile_n(c) == 0]


def write(path: pathlib.Path, picks: dict[str, Config | DwConfig], about: dict) -> None:
    """Writes the table of this package updated with `picks` (key -> Config) to `path`; `about`
    (device, versions, date, command) joins the list of the runs that made it."""
    runs = json.loads(TABLE.read_text())["runs"] if TABLE.exists() else []
    configs = {name: dataclasses.asdict(config)
               for name, config in sorted((_table() | picks).items())}
    path.write_text(json.dumps({"runs": runs + [about], "configs": configs}, indent=1) + "\n")
