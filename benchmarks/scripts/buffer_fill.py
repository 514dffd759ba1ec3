"""The experts' forward and backward over a full receive buffer and over one that the groups
fill an eighth of, bf16 and FP8, on one device:

    python benchmarks/scripts/buffer_fill.py [--tokens 4096] [--experts 32] [--fill 8]

A dropless buffer is sized for the worst case: under EP=n it holds n * T * min(k, E_local)
rows, and an even spread fills T * k of them. The layer benchmark runs at EP=1, where every row
is filled, so it cannot show what a GPU spends on the rows past the groups. Here
`jep.expert_ffn` (loss: the sum of its output; gradients of the rows and the three weights)
runs over C = T * k rows filled, then over `fill` times as many rows with the same groups,
each jitted alone and profiled (device time per call, by kind: `jep.bench.profile`). What
grows between the two is work spent on unfilled rows. The weights' gradients of the two must
agree (the rows past the groups take no part): their largest difference relative to the
largest gradient is printed.

`--fp8-gated`: the FP8 products of gate and up and the activation in one kernel
(`grouped_matmul_fp8_gated`, its default configuration) whether or not the tuning table has an
"fp8_gated" entry for the shape (Hopper only; elsewhere FP8 is emulated either way).
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import jep
import jep_kernels.grouped_matmul.tuning as tuning
from jep.bench import profile


def step(precision: str):
    def loss(x, sizes, w_gate, w_up, w_down):
        y = jep.expert_ffn(x, sizes, w_gate, w_up, w_down, precision=precision)
        return y.astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4)))


@contextlib.contextmanager
def gated_fp8_kernel():
    """Within it `jep.experts` finds an "fp8_gated" entry for every shape: the kernel's
    default configuration."""
    table_entry = tuning.entry_for

    def entry_for(op, k, n, groups):
        if op == tuning.FP8_GATED:
            return tuning.default(op, k, n)
        return table_entry(op, k, n, groups)

    tuning.entry_for = entry_for
    try:
        yield
    finally:
        tuning.entry_for = table_entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32, help="local experts (groups)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--fill", type=int, default=8,
                        help="the larger buffer's rows over the filled ones (EP=8: 8)")
    parser.add_argument("--fp8-gated", action="store_true",
                        help="take the gated FP8 kernel whether or not the table has it")
    args = parser.parse_args(argv)
    with gated_fp8_kernel() if args.fp8_gated else contextlib.nullcontext():
        return measure(args)


def measure(args):
    rng = np.random.default_rng(0)
    filled = args.tokens * args.topk
    sizes = jnp.asarray(rng.multinomial(filled, np.full(args.experts, 1 / args.experts)),
                        jnp.int32)
    key = jax.random.key(0)
    weight = lambda i, shape: (jax.random.normal(  # noqa: E731
        jax.random.fold_in(key, i), shape, jnp.float32) / shape[1] ** 0.5).astype(jnp.bfloat16)
    weights = (weight(1, (args.experts, args.hidden, args.ffn)),
               weight(2, (args.experts, args.hidden, args.ffn)),
               weight(3, (args.experts, args.ffn, args.hidden)))
    rows = jax.random.normal(jax.random.fold_in(key, 0), (filled, args.hidden),
                             jnp.float32).astype(jnp.bfloat16)
    totals, differences = {}, {}
    for precision in ("bf16", "fp8"):
        grads = step(precision)
        weight_grads = {}
        for factor in (1, args.fill):
            # The same groups and rows; the rows past them zero, as dispatch leaves them.
            x = jnp.pad(rows, ((0, filled * (factor - 1)), (0, 0)))
            title = f"expert_ffn {precision}, {x.shape[0]} rows, {filled} in the groups"
            # Compiled once, for the gradients and the profile (which reads its HLO).
            compiled = grads.lower(x, sizes, *weights).compile()
            weight_grads[factor] = [np.asarray(g, np.float32)
                                    for g in compiled(x, sizes, *weights)[1:]]
            totals[(precision, factor)] = profile.report(compiled, (x, sizes, *weights), title)
            del x
        differences[precision] = max(
            float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
            for a, b in zip(weight_grads[1], weight_grads[args.fill]))
        print(f"{precision}: the weights' gradients of the two buffers differ by at most "
              f"{differences[precision]:.2e} of the largest", flush=True)
    for precision in ("bf16", "fp8"):
        full, big = (totals[(precision, f)].get("total", {}).get("us") for f in (1, args.fill))
        if full and big:
            print(f"{precision}: {full / 1e3:.3f} ms full, {big / 1e3:.3f} ms with {args.fill}x "
                  f"the rows: {(big - full) / 1e3:.3f} ms on the unfilled rows")
    return totals, differences


if __name__ == "__main__":
    main()
