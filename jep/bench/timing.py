"""Timing and the facts to print beside every figure."""

from __future__ import annotations

import datetime
import math
import os
import random
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def repeat_in_loop(body, stacked, iters: int):
    """Calls `body(*args)` `iters` times in a `fori_loop`, args taken in turn from the leading
    axis of each array of `stacked` (rotated inputs, so nothing is loop-invariant). Returns an
    f32 scalar that depends on every output (see `repeat_rotated`), so nothing is dead code.
    Traceable, also inside `shard_map`.

    The rotations are sliced apart once, before the loop (`repeat_rotated`): a slice taken
    inside the loop would be copied on every iteration for a custom call (a Pallas kernel, the
    ffi transport) and timed as its cost. The copy before the loop adds 1 / iters of it."""
    rotation = jax.tree.leaves(stacked)[0].shape[0]
    return repeat_rotated(body, [jax.tree.map(lambda a, r=r: a[r], stacked)
                                 for r in range(rotation)], iters)


def repeat_rotated(body, variants, iters: int):
    """Calls `body(*variants[i % R])` `iters` times in a `fori_loop` (R = len(variants)) and
    returns an f32 scalar that depends on every output, as `repeat_in_loop` does, but with each
    rotation's arguments in buffers of their own (a `lax.switch` picks one per iteration)
    instead of slices of a stacked array: a dynamic slice of a stacked array feeding a custom
    call (a Pallas kernel) is copied out first on every iteration, where XLA's own ops read it
    in place, and the copy would be timed as the kernel's.

    Every call's outputs are kept whole: the loop carries the latest ones and one element of
    each is added to the scalar, in the loop and after it. Reading them whole instead (a sum)
    would time a pass over every output with the body: as much again as a weight gradient of
    256 experts [256, 7168, 2048] takes to write.

    The body is called through one `jax.jit`, so that its calls (the first, and one in each
    branch) share one lowering: a Pallas kernel is lowered once instead of R + 1 times (a
    tuning candidate's lowering took half the time and its module a third of the size)."""
    body = jax.jit(body)

    def first_elements(out):
        return sum((leaf.reshape(-1)[0].astype(jnp.float32)
                    for leaf in jax.tree.leaves(out) if leaf.size), jnp.float32(0))

    branches = [lambda args=args: body(*args) for args in variants]

    def step(i, state):
        total, _ = state
        out = lax.switch(i % len(variants), branches)
        return total + first_elements(out), out

    out = body(*variants[0])  # the first call outside the loop: the carry's first value
    total, out = lax.fori_loop(1, iters, step, (first_elements(out), out))
    return total + first_elements(out)


def repeat_unrolled(body, variants, iters: int):
    """`body(*variants[i % R])` `iters` times written out one after another (no loop), each
    output read at one element into the f32 scalar returned. For ops of a few microseconds:
    on a GPU every step of a `fori_loop` (and every `lax.switch`) waits for a predicate on the
    host, which costs more than such an op. The body goes through one `jax.jit`, lowered once
    (`repeat_rotated`)."""
    body = jax.jit(body)
    total = jnp.zeros((), jnp.float32)
    for i in range(iters):
        for leaf in jax.tree.leaves(body(*variants[i % len(variants)])):
            if leaf.size:
                total = total + leaf.reshape(-1)[0].astype(jnp.float32)
    return total


def seconds_per_iteration(run, args, *, iters: int, repeats: int) -> float:
    """Median over `repeats` timed calls of the jitted `run(*args)` (which loops `iters` times),
    after one warm-up call; seconds per iteration. Raises what the run raises."""
    seconds = seconds_interleaved({"run": (run, args)}, iters=iters, repeats=repeats)["run"]
    if isinstance(seconds, Exception):
        raise seconds
    return seconds


def seconds_interleaved(runs: dict, *, iters: int, repeats: int, min_seconds: float = 0.0,
                        seed: int = 0) -> dict:
    """Like `seconds_per_iteration` for several jitted runs ({name: (run, args)}), timed in
    turn, one sample of each per round, so that each sees the same share of the GPU's power and
    clock states (under a power cap an H200's clock follows its recent load: a run timed alone
    right after idle time runs faster than one timed after heavy work). Each round takes the
    runs in a fresh random order (seeded): in a fixed order each run would always follow the
    same one, and an H200 ran one kernel, timed twice per round, 10% slower in one place than
    in the other.

    A sample is one call, or with `min_seconds` as many calls back to back as take that long
    (counted from the time of one call after the warm-up). Long enough, about a second on an
    H200, and every run is timed in the steady state its own power draw leads to, the state of
    a long training step, instead of in whatever state the run before left. Each is called
    once first (compiled, warmed up); one that raises gets its exception instead of a time."""
    order = random.Random(seed)
    seconds, ready = {}, {}
    for name, (run, args) in runs.items():
        try:
            jax.block_until_ready(run(*args))  # compiles
            calls = 1
            if min_seconds > 0:
                start = time.perf_counter()
                jax.block_until_ready(run(*args))
                calls = max(1, math.ceil(min_seconds / (time.perf_counter() - start)))
            ready[name] = (run, args, calls)
        except Exception as error:  # noqa: BLE001 - the caller reports it
            seconds[name] = error
    times = {name: [] for name in ready}
    for _ in range(repeats):
        for name in order.sample(list(ready), len(ready)):
            run, args, calls = ready[name]
            start = time.perf_counter()
            for _ in range(calls):
                out = run(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls)
    seconds |= {name: statistics.median(t) / iters for name, t in times.items()}
    return seconds


def dispatch_steps(step, variants, steps: int):
    """`steps` calls of `step(*variants[i % R])`, one after another from Python, without
    waiting for any; the last call's outputs."""
    for i in range(steps):
        out = step(*variants[i % len(variants)])
    return out


def seconds_dispatched(step, variants, *, steps: int, repeats: int) -> float:
    """Seconds per call of the jitted `step`, called as a training loop calls its step: `steps`
    calls dispatched one after another from Python (`step(*variants[i % R])`), the host running
    ahead of the device, then a wait for the last call's outputs (a device runs the calls in
    order); the median over `repeats` such runs, after one warm-up call. Unlike a loop inside
    one program (`repeat_in_loop`), nothing waits on the host between steps: on a GPU each step
    of a `fori_loop` waits for its predicate to reach the host, and the device idles while the
    next step's first kernels are launched. Each call's outputs are dropped when the next call
    is made, as a training loop drops its gradients once applied: kept, the outputs of every
    call in flight would have to fit in memory at once (a DeepSeek-V3 layer's gradients are
    22 GB a step). Raises what the step raises."""
    jax.block_until_ready(step(*variants[0]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = dispatch_steps(step, variants, steps)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps)
        del out
    return statistics.median(times)


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
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
