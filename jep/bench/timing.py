"""Timing and the facts to print beside every figure."""

from __future__ import annotations

import datetime
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def repeat_in_loop(body, stacked, iters: int):
    """Calls `body(*args)` `iters` times in a `fori_loop`, args taken in turn from the leading
    axis of each array of `stacked` (rotated inputs, so nothing is loop-invariant). Returns an
    f32 scalar that depends on every output, so nothing is dead code. Traceable, also inside
    `shard_map`."""
    rotation = jax.tree.leaves(stacked)[0].shape[0]

    def step(i, total):
        args = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i % rotation, keepdims=False), stacked)
        out = body(*args)
        return total + sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))

    # zeros_like: under shard_map the carry varies over the mesh axes the inputs vary over.
    start = jnp.zeros_like(jax.tree.leaves(stacked)[0], shape=(), dtype=jnp.float32)
    return lax.fori_loop(0, iters, step, start)


def seconds_per_iteration(run, args, *, iters: int, repeats: int) -> float:
    """Median over `repeats` timed calls of the jitted `run(*args)` (which loops `iters` times),
    after one warm-up call; seconds per iteration."""
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / iters


def compiled_bytes(compiled) -> int | None:
    """Device memory a compiled program needs per device (arguments, outputs and temporaries), as
    XLA's memory analysis reports it; None where the backend does not say."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def environment() -> dict:
    import jaxlib

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{len(jax.devices())} x {device.device_kind}",
        "platform": device.platform,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
