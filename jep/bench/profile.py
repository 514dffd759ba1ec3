"""What a run does on the devices, from JAX's profiler: the kernels on each stream, how long each
stream was busy, and how much of that time two streams were busy at once (the overlap of
communication and compute); and where a step's time goes by kind of work (`breakdown`).

    events = profile.device_events(profile.trace(run, args, "/tmp/trace"))
    print(profile.summary(events))
    print(profile.breakdown_table(profile.breakdown(events, profile.op_names(compiled))))
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax


def trace(run, args, log_dir: str, calls: int = 1) -> str:
    """Runs `run(*args)` `calls` times (after a warm-up call) under the profiler; the path of
    the Chrome trace (JSON) it wrote."""
    jax.block_until_ready(run(*args))
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(run(*args))
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    return max(paths, key=os.path.getmtime)


def device_events(path: str) -> list[dict]:
    """The complete events of the trace's device processes ("/device:GPU:0", ...): dicts of
    device, stream, name, start and duration (microseconds), and the event's args (the HLO
    instruction that launched a kernel is among them, as "hlo_op", where the profiler knows it)."""
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
                      "name": e["name"], "start": float(e["ts"]), "duration": float(e.get("dur", 0)),
                      "args": e.get("args", {})})
    return found


# Kinds of work in a step of the MoE layer, each found by the name scope jep puts its ops under
# (in the ops' metadata) or by its kernel's name (jep's Pallas kernels are named after their
# scope), the first that matches; what matches none is "element-wise and other" (activations,
# the loss, sums of gradients).
KINDS = (
    ("grouped forward", ("jep_grouped_forward",)),
    ("grouped dx", ("jep_grouped_dx",)),
    ("grouped FP8 dw", ("jep_grouped_dw_fp8",)),
    ("grouped dw", ("jep_grouped_dw",)),
    ("grouped FP8 (forward and dx)", ("jep_grouped_fp8",)),
    ("FP8 quantization", ("jep_fp8_quantize",)),
    ("exchange", ("jep_exchange", "all-to-all", "all_to_all", "nccl", "RaggedAllToAll",
                  "MultiGpuBarrier")),
    ("routing and layout", ("jep_route", "jep_layout")),
    ("permutes", ("jep_permute",)),
)
OTHER = "element-wise and other"


def op_names(compiled_or_text) -> dict[str, str]:
    """HLO instruction name -> the op_name of its metadata (the JAX name stack), from a compiled
    program's optimized HLO; each name also with its dots as underscores, as XLA names the
    kernel of a fusion ("loop_convert_fusion_16" for "loop_convert_fusion.16"): the profiler's
    `hlo_op` of a kernel inside a command buffer (a CUDA graph) names the buffer, not the op."""
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    found = {}
    for line in text.splitlines():
        match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*metadata=\{[^}]*op_name="([^"]*)"', line)
        if match:
            found.setdefault(match.group(1), match.group(2))
            found.setdefault(match.group(1).replace(".", "_"), match.group(2))
    return found


def _op_name(event: dict, names: dict[str, str]) -> str:
    """The op_name of the HLO instruction that launched a device event, "" where unknown."""
    return (names.get(str(event["args"].get("hlo_op", "")))
            or names.get(event["name"])
            or "")


def kind_of(event: dict, names: dict[str, str]) -> str:
    """The kind (`KINDS`) of a device event, from the op_name of the HLO instruction that
    launched it, its args and its kernel name."""
    text = " ".join([_op_name(event, names), event["name"],
                     *(str(v) for k, v in event["args"].items() if k in ("tf_op", "long_name"))])
    for kind, marks in KINDS:
        if any(mark in text for mark in marks):
            return kind
    return OTHER


def breakdown(events: list[dict], names: dict[str, str], steps: int = 1) -> dict[str, dict]:
    """{kind: {"us": microseconds per step, "kernels": launches per step}} over the events of
    the first device, in the order of `KINDS`, then "element-wise and other", then "total"."""
    if not events:
        return {}
    device = min(e["device"] for e in events)
    totals = {kind: {"us": 0.0, "kernels": 0} for kind, _ in KINDS} | {OTHER: {"us": 0.0, "kernels": 0}}
    for e in events:
        if e["device"] == device:
            entry = totals[kind_of(e, names)]
            entry["us"] += e["duration"] / steps
            entry["kernels"] += 1
    totals["total"] = {"us": sum(t["us"] for t in totals.values()),
                       "kernels": sum(t["kernels"] for t in totals.values())}
    for t in totals.values():
        t["kernels"] /= steps
    return totals


def breakdown_table(totals: dict[str, dict]) -> str:
    """`breakdown` as lines of kind, ms per step, share of the kernels' time, launches."""
    total = totals.get("total", {}).get("us") or 1.0
    return "\n".join(f"    {kind:<24} {t['us'] / 1e3:8.3f} ms  {100 * t['us'] / total:5.1f}%  "
                     f"{t['kernels']:6.1f} kernels" for kind, t in totals.items())


def _union(spans) -> float:
    """Microseconds covered by the (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summary(events: list[dict], top: int = 12, gaps: int = 8) -> str:
    """Per device: each stream's busy time, the time any stream was busy, the time two or more
    were (overlap), the span from first to last kernel, the `top` longest kernels, and the idle
    time between kernels with its `gaps` longest spans (`idle_gaps`)."""
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
        lines += _gap_lines(device_events_, top=gaps)
    return "\n".join(lines)


def graph_of(event: dict):
    """The CUDA graph that launched a kernel event (XLA's command buffers), or None for a
    kernel launched on its own."""
    return event.get("args", {}).get("cuda_graph_id") or None


def _gaps(events: list[dict]) -> list[tuple[float, dict, dict]]:
    found, reach, last = [], None, None
    for e in sorted(events, key=lambda e: e["start"]):
        end = e["start"] + e["duration"]
        if reach is not None and e["start"] > reach:
            found.append((e["start"] - reach, last, e))
        if reach is None or end >= reach:
            reach, last = end, e
    return found


def idle_gaps(events: list[dict]) -> list[tuple[float, str, str]]:
    """The spans of one device's time between its first and last kernel when no stream ran a
    kernel: (microseconds, the kernel that ended before, the kernel that started after), in
    time order."""
    return [(us, before["name"], after["name"]) for us, before, after in _gaps(events)]


def _graph_line(events: list[dict]) -> str:
    """How the device's kernels were launched: CUDA graphs (distinct, and launches: runs of
    one graph's kernels in time order) and kernels launched on their own."""
    graphs = [graph_of(e) for e in sorted(events, key=lambda e: e["start"])]
    launches = sum(1 for i, g in enumerate(graphs) if g is not None
                   and (i == 0 or graphs[i - 1] != g))
    alone = sum(1 for g in graphs if g is None)
    return (f"  launched: {launches} CUDA graph launches ({len(set(graphs) - {None})} graphs), "
            f"{alone} of {len(graphs)} kernels on their own")


def _gap_lines(events: list[dict], top: int) -> list[str]:
    """The device's idle time between kernels: in all, by size, and the longest spans with the
    kernels on either side and the CUDA graph of each (-: launched on its own); the kernels'
    launches, or a wait on the host, are behind them."""
    gaps = _gaps(events)
    lines = [_graph_line(events)]
    if not gaps:
        return lines
    sizes = [us for us, _, _ in gaps]
    lines.append(f"  idle {sum(sizes):.1f} us in {len(sizes)} gaps: "
                 + ", ".join(f"{sum(1 for s in sizes if lo <= s < hi)} of {lo:g}-{hi:g} us"
                             for lo, hi in ((0, 2), (2, 5), (5, 20), (20, 100)))
                 + f", {sum(1 for s in sizes if s >= 100)} of 100 us or more")
    graph = lambda e: graph_of(e) or "-"  # noqa: E731
    for us, before, after in sorted(gaps, key=lambda g: -g[0])[:top]:
        lines.append(f"    idle {us:8.1f} us after {before['name'][:50]} [{graph(before)}] "
                     f"before {after['name'][:50]} [{graph(after)}]")
    return lines


def compiled_program(run, args, compiled=None):
    """The compiled program whose HLO names `run`'s kernels (`op_names`): `compiled` where
    given, else `run` if it is one (`jax.jit(f).lower(...).compile()`), else `run` (a jitted
    function) lowered and compiled for `args`."""
    if compiled is not None:
        return compiled
    return run if hasattr(run, "as_text") else run.lower(*args).compile()


def report(run, args, title: str, steps: int = 1, compiled=None) -> dict:
    """Prints `summary` of one run of `run(*args)` (`steps` steps) and its `breakdown` per step,
    under `title`; returns the breakdown ({} where there are no device events: the CPU has no
    device streams). `compiled`: the compiled program whose HLO names the kernels (`op_names`),
    where `run` is not one (a Python loop calling it); by default `run` itself, or a jitted
    `run` compiled for `args` (`compiled_program`), which is then what runs: one compilation."""
    program = compiled_program(run, args, compiled)
    with tempfile.TemporaryDirectory() as log_dir:
        events = device_events(trace(run if compiled is not None else program, args, log_dir))
    print(f"--- profile: {title}")
    if not events:
        print("(no device events: the CPU has no device streams)")
        return {}
    print(summary(events))
    names = op_names(program)
    totals = breakdown(events, names, steps)
    device = min(e["device"] for e in events)  # the one `breakdown` counts
    print(f"  per step, by kind ({device}):")
    print(breakdown_table(totals))
    # The five longest kernels of each kind, with the op behind each where it is known.
    longest = collections.defaultdict(collections.Counter)
    for e in events:
        if e["device"] == device:
            op = (_op_name(e, names) or "?")[-70:]
            longest[kind_of(e, names)][(e["name"][:60], op)] += e["duration"]
    for kind in totals:
        for (name, op_name), us in longest[kind].most_common(5):
            print(f"    {kind}: {us / steps:9.1f} us  {name}  [{op_name}]")
    print(f"  (args of one kernel event: {sorted(events[0]['args'])})")
    return totals
