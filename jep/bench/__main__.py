"""python -m jep.bench transport|decode|gemm|permute|quantize|layer|routing|all|tune [flags]; see `--help`.

`tune` (GPU only, not part of `all`) times the Pallas grouped GEMM's candidate configurations on
the --gemm-shapes and writes the tuning table the fastest make (OUT/table.json)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU platform reads this: 8 simulated devices for the EP axis there.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jep.bench import (decode, gemm, layer, permute, quantize, report, routing,  # noqa: E402
                       timing, transport, tune, workloads)
from jep_kernels.grouped_matmul import tuning  # noqa: E402

SUITES = ("transport", "decode", "gemm", "permute", "quantize", "layer", "routing")


def _ints(text):
    return [int(v) for v in text.split(",")]


def _ops(text):
    names = text.split(",")
    if unknown := [name for name in names if name not in tuning.TUNED]:
        raise argparse.ArgumentTypeError(f"{unknown} not among {tuning.TUNED}")
    return names


def _layer_variants(text):
    names = text.split(",")
    if unknown := [name for name in names if name not in layer.VARIANT_GROUPS]:
        raise argparse.ArgumentTypeError(f"{unknown} not among {tuple(layer.VARIANT_GROUPS)}")
    return names


def _gemm_peers(text):
    names = [] if text == "none" else text.split(",")
    if unknown := [name for name in names if name not in gemm.PEERS]:
        raise argparse.ArgumentTypeError(f"{unknown} not among {gemm.PEERS}")
    return names


def _shapes(text):
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jep.bench", description=__doc__)
    a = p.add_argument
    a("suite", choices=SUITES + ("all", "tune"), help="what to measure")
    a("--tokens", type=_ints, default=[4096], help="tokens per rank, comma-separated (transport and decode sweep them)")
    a("--hidden", type=int, default=7168, help="H")
    a("--ffn", type=int, default=2048, help="F, hidden width of an expert (layer)")
    a("--experts", type=int, default=256, help="E")
    a("--topk", type=int, default=8, help="k")
    a("--model", choices=tuple(layer.MODELS), default=None,
      help="a real model's MoE block: sets --hidden, --ffn, --experts and --topk")
    a("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="token and weight dtype")
    a("--routing", default="uniform", choices=workloads.ROUTINGS, help="routing of tokens (and group sizes)")
    a("--gemm-shapes", type=_shapes, default=_shapes("32768x7168x2048x8,32768x7168x2048x64,32768x1024x512x8"),
      help="grouped GEMM shapes MxKxNxG, comma-separated")
    a("--gemm-peers", type=_gemm_peers, default=list(gemm.PEERS),
      help="gemm: the variants timed beside jep and the dense matmul, comma-separated, of "
           f"{','.join(gemm.PEERS)}, or none (default: all that run here)")
    a("--experts-sweep", type=_ints, default=[64, 4096],
      help="numbers of experts the routing suite compares, comma-separated")
    a("--nodes", type=int, default=1,
      help="transport: the devices as (node, local) axes of this many nodes; measures the flat "
           "and the hierarchical modes, with the bytes that cross the node axis")
    a("--tune-ops", type=_ops, default=list(tuning.OPS),
      help=f"tune: the products to tune, comma-separated, of "
           f"{','.join(tuning.TUNED)} (fp8: the FP8 kernel, forward and dx alike; dw_fp8: "
           f"the FP8 weight gradient, beside the table's bf16 one; dx_sum: "
           f"the dx of two weights summed in one kernel, as of the gate and up products; "
           f"gated: the gate and up products and the activation in one kernel; fp8_gated: "
           f"the same in FP8; dw_fp8_pair: the gate and up FP8 weight gradients in one)")
    a("--iters", type=int, default=20, help="iterations inside one jitted loop")
    a("--repeats", type=int, default=5, help="timed loops; the median is reported")
    a("--min-seconds", type=float, default=0.0,
      help="gemm and tune: each timed sample repeats its loop back to back for at least this "
           "long (about 1 s puts every kernel in the GPU's steady power state; 0: one loop)")
    a("--transports", type=lambda t: [] if t == "none" else t.split(","), default=None,
      help="decode: the transports jep.dispatch is timed with, comma-separated, or none "
           "(default: all that run here)")
    a("--layer-variants", type=_layer_variants, default=list(layer.VARIANT_GROUPS),
      help="layer: the variants to time, comma-separated, of "
           f"{','.join(layer.VARIANT_GROUPS)} (default: all)")
    a("--profile", action="store_true",
      help="decode and layer: also print each variant's GPU kernels and the streams' overlap, "
           "from one profiled run")
    a("--out", default="out/bench", help="folder for results.json and the plots")
    args = p.parse_args(argv)
    if args.model is not None:
        shape = layer.MODELS[args.model]
        args.hidden, args.ffn, args.experts, args.topk = (
            shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"])
    if args.min_seconds < 0:
        p.error("--min-seconds must be >= 0")
    if min(min(args.tokens), args.hidden, args.ffn, args.experts, args.topk, args.iters, args.repeats) < 1:
        p.error("sizes and counts must be >= 1")
    if args.topk > args.experts:
        p.error(f"--topk {args.topk} must be at most --experts {args.experts}")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    suites = SUITES if args.suite == "all" else (args.suite,)
    command = "python -m jep.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.suite == "tune":
        return _tune(args, dtype, command)
    jobs = []
    if "transport" in suites:
        jobs += [("transport", t) for t in args.tokens]
    if "decode" in suites:
        jobs += [("decode", t) for t in args.tokens]
    if "gemm" in suites:
        jobs.append(("gemm", None))
    if "permute" in suites:
        jobs.append(("permute", args.tokens[-1]))
    if "quantize" in suites:
        jobs.append(("quantize", None))
    if "layer" in suites:
        jobs.append(("layer", args.tokens[-1]))
    if "routing" in suites:
        jobs.append(("routing", args.tokens[-1]))
    results = []
    environment = timing.environment()
    print(f"{environment['device']}, jax {environment['jax']}, {environment['date']}")
    for suite, tokens in tqdm(jobs, desc="jep.bench"):
        common = dict(dtype=dtype, iters=args.iters, repeats=args.repeats)
        if suite == "transport" and args.nodes > 1:
            results += transport.measure_two_level(
                tokens=tokens, hidden=args.hidden, experts=args.experts, top_k=args.topk,
                routing=args.routing, nodes=args.nodes, **common)
        elif suite == "transport":
            results += transport.measure(tokens=tokens, hidden=args.hidden, experts=args.experts,
                                         top_k=args.topk, routing=args.routing, **common)
        elif suite == "decode":
            results += decode.measure(tokens=tokens, hidden=args.hidden, experts=args.experts,
                                      top_k=args.topk, routing=args.routing,
                                      profile=args.profile, transports=args.transports, **common)
        elif suite == "gemm":
            results += gemm.measure(shapes=args.gemm_shapes, routing=args.routing,
                                    min_seconds=args.min_seconds, peers=args.gemm_peers,
                                    **common)
        elif suite == "permute":
            results += permute.measure(tokens=tokens, hidden=args.hidden, top_k=args.topk, **common)
        elif suite == "quantize":
            results += quantize.measure(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn,
                                        experts=args.experts, **common)
        elif suite == "routing":
            results += routing.measure(tokens=tokens, experts_sweep=args.experts_sweep,
                                       top_k=args.topk, iters=args.iters, repeats=args.repeats)
        else:
            results += layer.measure(tokens=tokens, hidden=args.hidden, ffn=args.ffn,
                                     experts=args.experts, top_k=args.topk,
                                     profile=args.profile, model=args.model,
                                     groups=args.layer_variants, **common)
    report.write(results, environment, args.out, command)
    print(report.table(results))
    print(f"results and plots in {args.out}")
    return results


def _tune(args, dtype, command):
    environment = timing.environment()
    print(f"{environment['device']}, jax {environment['jax']}, {environment['date']}")
    results, picks = tune.measure(shapes=args.gemm_shapes, dtype=dtype, routing=args.routing,
                                  iters=args.iters, repeats=args.repeats,
                                  min_seconds=args.min_seconds, ops=args.tune_ops)
    report.write(results, environment, args.out, command)
    path = tune.write_table(picks, environment, args.out, command)
    print(report.table(results))
    print(f"tuning table in {path}; results in {args.out}")
    return results


if __name__ == "__main__":
    main()
