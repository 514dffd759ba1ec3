"""Token-row permutes: jep's Pallas kernels (`jep_kernels.permute`) against XLA's gathers, on one
device.

  expand:  out[i] = rows[index[i]] (`gather`), as dispatch's local expansion: M rows out of M,
           a quarter of them empty (zero), the others a random permutation of the rows; also
           jep's XLA gather of 2-byte rows as 32-bit words ("jep/xla", `permute.xla.gather`);
  combine: out[i] = sum_j weights[i, j] * rows[index[i, j]] (`gather_sum`, k = --topk), as the
           sums of combine: two valid entries a row, as at EP=4 with top-8 (the rest empty).

M = 4 x tokens rows of H. Each iteration feeds its output back as the next input (a chain in
one `fori_loop`), so no extra pass over the output is timed. Bytes = rows read + rows written,
the zero rows included; "xla elementwise" (rows + 1, one read and one write) is the device's
plain memory rate for scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jep_kernels.permute
from jep.bench import timing
from jep.platform import on_hopper


def _chain(op, iters):
    def run(rows, *args):
        out = lax.fori_loop(0, iters, lambda i, r: op(r, *args), rows)
        return jnp.sum(out.astype(jnp.float32))
    return jax.jit(run)


def measure(*, tokens: int, hidden: int, top_k: int, dtype, iters: int, repeats: int,
            seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    m = 4 * tokens
    rows = jnp.asarray(rng.normal(size=(m, hidden)), dtype)
    row_bytes = hidden * jnp.dtype(dtype).itemsize

    expand = rng.permutation(m).astype(np.int32)
    expand[rng.random(m) < 0.25] = -1
    valid = min(2, top_k)
    combine = np.full((m, top_k), -1, np.int32)
    combine[:, :valid] = rng.integers(0, m, size=(m, valid))
    weights = jnp.asarray(rng.random((m, top_k)), jnp.float32)
    ops = {
        "expand": ((jnp.asarray(expand),), (int((expand >= 0).sum()) + m) * row_bytes,
                   {"xla": jep_kernels.permute.reference.gather,
                    "jep/xla": jep_kernels.permute.xla.gather,
                    "jep/pallas": jep_kernels.permute.gather}),
        "combine": ((jnp.asarray(combine), weights), (m * valid + m) * row_bytes,
                    {"xla": jep_kernels.permute.reference.gather_sum,
                     "jep/pallas": jep_kernels.permute.gather_sum}),
        "elementwise": ((), 2 * m * row_bytes, {"xla elementwise": lambda r: r + 1}),
    }
    results = []
    for op, (args, moved, variants) in ops.items():
        for variant, fn in variants.items():
            if variant == "jep/pallas" and not on_hopper():
                continue
            entry = {"suite": "permute", "variant": variant, "op": op, "rows": m,
                     "hidden": hidden, "top_k": top_k, "bytes": moved}
            try:
                seconds = timing.seconds_per_iteration(_chain(fn, iters), (rows, *args),
                                                       iters=iters, repeats=repeats)
                entry |= {"seconds": seconds, "gb_per_s": moved / seconds / 1e9}
            except Exception as error:  # noqa: BLE001 - a failing variant is a result
                entry |= {"seconds": None, "gb_per_s": None,
                          "error": str(error).splitlines()[0][:200]}
            results.append(entry)
    return results
