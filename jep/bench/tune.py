"""Tuning the Pallas grouped GEMM: every candidate configuration of each product (forward, dx, dw)
on each shape, timed; the fastest per (op, K, N, G) makes the tuning table. GPU only.

Shapes are given as for the gemm suite (M x K x N with G groups, w [G, K, N]); the table keys
each product by its own K and N (`jep_kernels.grouped_matmul.tuning`). The table is written to
`OUT/table.json`; copy it to `jep_kernels/grouped_matmul/table.json` to use it.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from jep import fp8
from jep.bench import gemm, timing, workloads
import jep_kernels.grouped_matmul as gm
from jep_kernels.grouped_matmul import mgpu, tuning


def _fp8_operands(rotations):
    """Each rotation (x, w, dy, sizes) as the FP8 kernel's forward takes it: x quantized per
    1 x 128 tile, w per 128 x 128 block and transposed (K-major), as tuples."""
    def quantized(x, w, dy, sizes):
        weight = workloads.quantize_weight(w)
        return fp8.quantize_rows(x), (weight.q_t, weight.scales_t), None, sizes
    return [quantized(*r) for r in rotations]


def _fp8_dw_operands(rotations):
    """Each rotation (x, w, dy, sizes) as the FP8 weight gradient takes it, beside the bf16
    one: x and dy each as (itself, quantized along the rows by `jep.fp8.quantize_columns`)."""
    return [((x, fp8.quantize_columns(x, sizes)), None, (dy, fp8.quantize_columns(dy, sizes)),
             sizes) for x, w, dy, sizes in rotations]


def _paired_operands(rotations):
    """For "dx_sum" and "gated": each rotation (x, w, dy, sizes) with the next rotation's w and
    dy beside its own, as tuples (two weights in buffers of their own, as the gate and up
    weights are)."""
    return [(x, (w, rotations[(i + 1) % len(rotations)][1]),
             (dy, rotations[(i + 1) % len(rotations)][2]), sizes)
            for i, (x, w, dy, sizes) in enumerate(rotations)]


def _fp8_paired_operands(rotations):
    """For "fp8_gated": `_paired_operands` as the FP8 kernels take them (`_fp8_operands`): x
    quantized per 1 x 128 tile, both weights per 128 x 128 block and transposed."""
    def quantized(w):
        weight = workloads.quantize_weight(w)
        return weight.q_t, weight.scales_t
    return [(fp8.quantize_rows(x), tuple(quantized(w) for w in ws), None, sizes)
            for x, ws, _, sizes in _paired_operands(rotations)]


def _fp8_dw_pair_operands(rotations):
    """For "dw_fp8_pair": `_paired_operands` with x and both dy quantized along the rows
    (`_fp8_dw_operands`)."""
    return [(fp8.quantize_columns(x, sizes), None,
             tuple(fp8.quantize_columns(dy, sizes) for dy in dys), sizes)
            for x, _, dys, sizes in _paired_operands(rotations)]


def _two_dw_fp8(config, num_rows: int):
    """The gate and up FP8 weight gradients as two kernels (`config`, the table's "dw_fp8"):
    what the kernel of both replaces."""
    def two(x, w, dys, sizes):
        return tuple(gm.grouped_matmul_dw_fp8(*x, *dy, sizes, num_rows=num_rows, config=config,
                                              out_dtype=jax.numpy.bfloat16) for dy in dys)
    return two


def _two_dx(config):
    """The summed dx as two dx kernels (`config`, the table's "dx") and XLA's sum of them: what
    the summing kernel replaces."""
    dx = _product("dx", config)
    return lambda x, ws, dys, sizes: sum(dx(x, w, dy, sizes) for dy, w in zip(dys, ws))


def _apart(config, op="forward"):
    """The gated product as two `op` kernels ("forward", or "fp8" for "fp8_gated"; `config`,
    the table's) and XLA's SiLU of one times the other: what the gated kernel replaces."""
    forward = _product(op, config)

    def apart(x, ws, dys, sizes):
        gate, up = (forward(x, w, None, sizes) for w in ws)
        return (jax.nn.silu(gate.astype(np.float32)) * up.astype(np.float32)).astype(gate.dtype)

    return apart


def _describe(op, config) -> str:
    if op in ("dw", tuning.DW_FP8, tuning.DW_FP8_PAIR):  # a DwConfig: K x N blocks, rows a step
        kind = "ws" if config.warp_specialized else "plain"
        epilogue = (f" e{config.epilogue_k}x{config.epilogue_n}"
                    if config.warp_specialized else "")
        resident = (f" resident {config.resident_steps} run {config.run_k_blocks or 'K'}"
                    if config.resident_steps else "")
        return (f"{kind} {config.block_k}x{config.block_n}x{config.block_rows} "
                f"s{config.max_concurrent_steps}{epilogue}{resident}")
    kind = "plain"
    if config.warp_specialized:
        kind = f"ws split {config.split}"
        if config.cluster_n > 1:
            kind += f" cluster {config.cluster_n}"
        if config.band > 1:
            kind += f" band {config.band}"
        if config.swizzled_epilogue:
            kind += " swizzled epilogue"
        if config.acc_rows:
            kind += f" acc rows {config.acc_rows}"
        if config.across_tiles:
            kind += " across tiles"
    return (f"{kind} {config.block_m}x{config.block_n}x{config.block_k} "
            f"s{config.max_concurrent_steps}")


def _product(op, config, interpret: bool = False, num_rows: int = 0):
    if op == tuning.FP8:  # operands quantized before the loop (`_fp8_operands`)
        return lambda x, w, dy, sizes: gm.grouped_matmul_fp8(*x, *w, sizes, config=config,
                                                             interpret=interpret)
    if op == tuning.DW_FP8:  # operands quantized before the loop (`_fp8_dw_operands`)
        return lambda x, w, dy, sizes: gm.grouped_matmul_dw_fp8(
            *x[1], *dy[1], sizes, num_rows=num_rows, config=config,
            out_dtype=jax.numpy.bfloat16, interpret=interpret)
    if op == tuning.DW_FP8_PAIR:  # operands paired and quantized (`_fp8_dw_pair_operands`)
        return lambda x, w, dys, sizes: gm.grouped_matmul_dw_fp8(
            *x, [dy for dy, _ in dys], [s for _, s in dys], sizes, num_rows=num_rows,
            config=config, out_dtype=jax.numpy.bfloat16, interpret=interpret)
    if op == "forward":
        return lambda x, w, dy, sizes: mgpu.grouped_matmul(x, w, sizes, config=config,
                                                           interpret=interpret)
    if op == "dx":
        return lambda x, w, dy, sizes: mgpu.grouped_matmul(dy, w, sizes, transpose_w=True,
                                                           config=config, interpret=interpret)
    if op == tuning.GATED:  # operands paired (`_paired_operands`); h, gate and up kept
        return lambda x, ws, dys, sizes: mgpu.grouped_matmul_gated(
            x, *ws, sizes, config=config, interpret=interpret)
    if op == tuning.FP8_GATED:  # operands paired and quantized (`_fp8_paired_operands`)
        return lambda x, ws, dys, sizes: gm.grouped_matmul_fp8_gated(
            *x, *ws[0], *ws[1], sizes, config=config, interpret=interpret)
    if op == tuning.DX_SUM:  # operands paired (`_paired_operands`)
        # The interpreter has no transposed shared-memory views: there w is transposed in memory.
        return lambda x, ws, dys, sizes: mgpu.grouped_matmul_sum(
            dys, [jax.numpy.swapaxes(w, 1, 2) for w in ws] if interpret else ws, sizes,
            transpose_w=not interpret, config=config, interpret=interpret)
    return lambda x, w, dy, sizes: mgpu.grouped_matmul_dw(x, dy, sizes, config=config,
                                                          interpret=interpret)


def measure(*, shapes, dtype, routing: str, iters: int, repeats: int,
            min_seconds: float = 0.0, ops=tuning.OPS, interpret: bool = False, seed: int = 0):
    """(results, picks): one result per (shape, op, candidate), with the dense matmul of the
    same flops timed among each product's candidates (`gemm.DENSE`; never picked), and the
    fastest candidate per tuning-table key. `ops`: which of the products to tune. `interpret`
    runs the kernels in Pallas's GPU interpret mode, on any platform (what it times says
    nothing of a GPU: for tests)."""
    if jax.default_backend() != "gpu" and not interpret:
        raise SystemExit("python -m jep.bench tune runs the Pallas Mosaic GPU kernels: it needs a "
                         "Hopper GPU")
    rng = np.random.default_rng(seed)
    results, picks = [], {}
    for m, k, n, g in shapes:
        rotations = workloads.gemm_operands(routing, rng, (m, k, n, g), dtype)
        for op in ops:
            flops = 2.0 * m * k * n * (
                2 if op in (tuning.DX_SUM, tuning.GATED, tuning.FP8_GATED, tuning.DW_FP8_PAIR)
                else 1)
            pk, pn = tuning.product_shape(op, k, n)
            bodies = {_describe(op, c): (_product(op, c, interpret, num_rows=m), c)
                      for c in tuning.candidates(op, pk, pn)}
            # The bf16 weight gradient of the table beside the FP8 one (never picked).
            if op == tuning.DW_FP8:
                bf16_dw = _product("dw", tuning.config_for("dw", pk, pn, g), interpret)
                bodies["bf16 dw (the table's)"] = (
                    lambda x, w, dy, sizes: bf16_dw(x[0], w, dy[0], sizes), None)
            if op in gemm.DENSE:  # none for the FP8 ops: the gemm suite times them beside it
                bodies["dense matmul"] = (gemm.DENSE[op], None)
            # What the one-kernel ops replace, timed beside them (an entry only where beaten).
            baseline_name = {tuning.DX_SUM: "two dx and their sum",
                             tuning.GATED: "two forwards and the activation",
                             tuning.FP8_GATED: "two FP8 products and the activation",
                             tuning.DW_FP8_PAIR: "two FP8 weight gradients"}.get(op)
            if op == tuning.DX_SUM and not interpret:
                bodies[baseline_name] = (_two_dx(tuning.config_for("dx", pk, pn, g)), None)
            if op == tuning.GATED and not interpret:
                bodies[baseline_name] = (_apart(tuning.config_for("forward", pk, pn, g)), None)
            if op == tuning.DW_FP8_PAIR and not interpret:
                bodies[baseline_name] = (_two_dw_fp8(tuning.config_for(tuning.DW_FP8, pk, pn, g),
                                                     m), None)
            if op == tuning.FP8_GATED and not interpret:
                bodies[baseline_name] = (_apart(tuning.config_for(tuning.FP8, pk, pn, g),
                                                tuning.FP8), None)
            operands = (_fp8_operands(rotations) if op == tuning.FP8 else
                        _fp8_dw_operands(rotations) if op == tuning.DW_FP8 else
                        _fp8_paired_operands(rotations) if op == tuning.FP8_GATED else
                        _fp8_dw_pair_operands(rotations) if op == tuning.DW_FP8_PAIR else
                        _paired_operands(rotations) if op in (tuning.DX_SUM, tuning.GATED)
                        else rotations)
            runs = {name: (jax.jit(lambda rotations, body=body:
                                   timing.repeat_rotated(body, rotations, iters)), (operands,))
                    for name, (body, _) in bodies.items()}
            # The candidates of one product timed in turn, round by round, so that each sees
            # the same power and clock states (seconds_interleaved).
            timed = timing.seconds_interleaved(runs, iters=iters, repeats=repeats,
                                               min_seconds=min_seconds)
            best = None
            for name, seconds in timed.items():
                config = bodies[name][1]
                entry = {"suite": "tune", "variant": name, "op": op, "m": m, "k": k, "n": n,
                         "groups": g, "routing": routing,
                         "config": None if config is None else dataclasses.asdict(config)}
                if isinstance(seconds, Exception):  # e.g. more shared memory than there is
                    entry |= {"seconds": None, "tflop_per_s": None,
                              "error": str(seconds).splitlines()[0][:200]}
                else:
                    entry |= {"seconds": seconds, "tflop_per_s": flops / seconds / 1e12}
                    if config is not None and (best is None or seconds < best[0]):
                        best = (seconds, config)
                results.append(entry)
            baseline = timed.get(baseline_name)
            if isinstance(baseline, float) and best is not None and best[0] >= baseline:
                best = None  # no entry: the kernels it replaces stay (`tuning.entry_for`)
            if best is not None:
                picks[tuning.key(op, pk, pn, g)] = best[1]
    for r in results:
        pk, pn = tuning.product_shape(r["op"], r["k"], r["n"])
        pick = picks.get(tuning.key(r["op"], pk, pn, r["groups"]))
        r["picked"] = pick is not None and dataclasses.asdict(pick) == r["config"]
    return results, picks


def write_table(picks, environment: dict, out: str, command: str) -> pathlib.Path:
    path = pathlib.Path(out) / "table.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tuning.write(path, picks, {**environment, "command": command})
    return path
