"""What a run does on the devices, from JAX's profiler: the kernels on each stream, how long each
stream was busy, and how much of that time two streams were busy at once (the overlap of
communication and compute).

    events = profile.device_events(profile.trace(run, args, "/tmp/trace"))
    print(profile.summary(events))
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

import jax


def trace(run, args, log_dir: str) -> str:
    """Runs `run(*args)` once (after a warm-up call) under the profiler; the path of the Chrome
    trace (JSON) it wrote."""
    jax.block_until_ready(run(*args))
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        jax.block_until_ready(run(*args))
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    return max(paths, key=os.path.getmtime)


def device_events(path: str) -> list[dict]:
    """The complete events of the trace's device processes ("/device:GPU:0", ...): dicts of
    device, stream, name, start and duration (microseconds)."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    found = []
    for e in events:
        process = processes.get(e.get("pid"), "")
        if e.get("ph") != "X" or "/device:" not in process or "CPU" in process:
            continue
        found.append({"device": process, "stream": threads.get((e["pid"], e["tid"]), str(e["tid"])),
                      "name": e["name"], "start": float(e["ts"]), "duration": float(e.get("dur", 0))})
    return found


def _union(spans) -> float:
    """Microseconds covered by the (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summary(events: list[dict], top: int = 12) -> str:
    """Per device: each stream's busy time, the time any stream was busy, the time two or more
    were (overlap), the span from first to last kernel, and the longest kernels."""
    lines = []
    by_device = collections.defaultdict(list)
    for e in events:
        by_device[e["device"]].append(e)
    for device, device_events_ in sorted(by_device.items()):
        spans = collections.defaultdict(list)
        for e in device_events_:
            spans[e["stream"]].append((e["start"], e["start"] + e["duration"]))
        busy = {stream: _union(s) for stream, s in spans.items()}
        everything = [span for s in spans.values() for span in s]
        any_busy = _union(everything)
        first, last = min(s for s, _ in everything), max(e for _, e in everything)
        lines.append(f"{device}: {last - first:.1f} us from first to last kernel, busy "
                     f"{any_busy:.1f} us, overlapped {sum(busy.values()) - any_busy:.1f} us")
        for stream, value in sorted(busy.items(), key=lambda kv: -kv[1]):
            lines.append(f"  stream {stream}: busy {value:.1f} us, {len(spans[stream])} kernels")
        kernels = collections.Counter()
        counts = collections.Counter()
        for e in device_events_:
            kernels[e["name"][:90]] += e["duration"]
            counts[e["name"][:90]] += 1
        for name, total in kernels.most_common(top):
            lines.append(f"    {total:9.1f} us  x{counts[name]:<4d} {name}")
    return "\n".join(lines)


def report(run, args, title: str) -> None:
    """Prints `summary` of one run of `run(*args)`, under `title`."""
    with tempfile.TemporaryDirectory() as log_dir:
        events = device_events(trace(run, args, log_dir))
    print(f"--- profile: {title}")
    print(summary(events) if events else "(no device events: the CPU has no device streams)")
