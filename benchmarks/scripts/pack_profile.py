"""FP8 dispatch's pack pass against a bf16 dispatch at EP=1, in device time per call (issue 21:
the pass at most 10% of the bf16 dispatch at 4096 tokens):

    python benchmarks/scripts/pack_profile.py [--tokens 4096] [--out pack_profile.json]

Each variant is jitted alone and called `--calls` times under JAX's profiler (after a warm-up
call); its device time per call is the sum of its kernels' durations over the calls, so a
loop's bookkeeping is not counted. The pack passes (`x` [T, H] bf16 into rows of u32 words,
e4m3 bytes then the scales' bytes): XLA's fusions of the reference (`jep.fp8.pack`), and on
Hopper the packing kernel (`jep_kernels.quantize.pack_rows`) with the scales' bytes stored by
the kernel itself and by an XLA pass after it. The dispatches: bf16 and FP8 on each transport
that runs here, top-8 of 256 uniform experts, one device. Their words are compared first.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jep
import jep_kernels.quantize
from jep import fp8
from jep.bench import profile, timing, workloads
from jep.platform import on_hopper


def device_us(fn, args, calls: int) -> float | None:
    """Device time per call of the jitted `fn(*args)`, from the profiler; None where it saw no
    device streams (the CPU)."""
    with tempfile.TemporaryDirectory() as log_dir:
        events = profile.device_events(profile.trace(fn, args, log_dir, calls))
    return sum(e["duration"] for e in events) / calls if events else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((1,), ("ep",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("ep")))  # noqa: E731
    x = put(jnp.asarray(rng.normal(size=(args.tokens, args.hidden)), jnp.bfloat16))
    ids = put(workloads.expert_ids("uniform", rng, (1, args.tokens), args.experts,
                                   args.topk)[0])

    packs = {"pack, XLA's fusions": jax.jit(lambda x: fp8.pack(*fp8.quantize_rows(x)))}
    if on_hopper() and jep_kernels.quantize.pack_kernel_takes(x):
        for tails in jep_kernels.quantize.TAILS:
            packs[f"pack, kernel, tails by {tails}"] = jax.jit(functools.partial(
                jep_kernels.quantize.pack_rows, tails=tails))
    want = np.asarray(packs["pack, XLA's fusions"](x))
    for name, pack in packs.items():
        same = np.array_equal(np.asarray(pack(x)), want)
        print(f"{name}: the reference's words: {same}", flush=True)

    def dispatch(backend: str, fp8_rows: bool):
        def local(x, ids):
            return jep.dispatch(x, ids, num_experts=args.experts, axis_name="ep",
                                backend=backend, fp8=fp8_rows)[0]
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    runs = {name: (pack, (x,)) for name, pack in packs.items()}
    for backend in jep.transport.names():
        for fp8_rows in (False, True):
            name = f"dispatch {backend}{' fp8' if fp8_rows else ''}"
            runs[name] = (dispatch(backend, fp8_rows), (x, ids))
    times = {}
    for name, (fn, fn_args) in runs.items():
        try:
            times[name] = device_us(fn, fn_args, args.calls)
        except Exception as e:  # a transport that does not run here
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        print(f"{name:40s} " + (f"{times[name]:9.1f} us" if times[name] is not None else
                                "(no device events: the CPU has no device streams)"),
              flush=True)
    bf16 = [us for name, us in times.items()
            if name.startswith("dispatch") and not name.endswith("fp8") and us]
    if bf16:
        base = min(bf16)
        for name, us in times.items():
            if name.startswith("pack") and us is not None:
                print(f"{name:40s} {100 * us / base:6.1f}% of the fastest bf16 dispatch "
                      f"({base:.1f} us)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": timing.environment(), "tokens": args.tokens,
                       "hidden": args.hidden, "experts": args.experts, "top_k": args.topk,
                       "device_us_per_call": times}, f, indent=1)
    return times


if __name__ == "__main__":
    main()
