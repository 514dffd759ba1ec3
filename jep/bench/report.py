"""Tables on stdout, JSON and PNG plots of the benchmark results."""

from __future__ import annotations

import json
import os

from jep.bench.transport import NVLINK_GBPS


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _times(value):
    """A ratio as "1.23x", or "-"."""
    return "-" if value is None else f"{value:.2f}x"


def _time_cell(result, scale, spec):
    """The time of a measurement in ms or us, or "-" and why it has none (out of memory...)."""
    if result["seconds"] is None:
        return f"- ({result.get('error', 'not measured')})"
    return format(result["seconds"] * scale, spec)


def _exchange_rows(results: list[dict], time_header: str) -> list[str]:
    """Table lines of dispatch/combine measurements: time and GB/s per rank."""
    return ([f"| tokens/rank | routing | variant | op | {time_header} | GB/s per rank |",
             "| --- | --- | --- | --- | --- | --- |"]
            + [f"| {r['tokens_per_rank']} | {r['routing']} | {r['variant']} | {r['op']} | "
               f"{_time_cell(r, 1e6, '.1f')} | {_fmt(r['gb_per_s'], '.4g')} |" for r in results])


def table(results: list[dict]) -> str:
    lines = []
    transport = [r for r in results if r["suite"] == "transport"]
    if transport:
        lines += _exchange_rows(transport, "time (us)")
        crossing = {r["variant"]: r["node_bytes_per_rank"] for r in transport
                    if "node_bytes_per_rank" in r}
        lines += [f"(across the node axis, {transport[0]['nodes']} nodes: "
                  + ", ".join(f"{v} {b / 2**20:.3g} MiB per rank" for v, b in crossing.items())
                  + ")"] if crossing else []
        lines += [f"(NVLink 4 one-way limit: {NVLINK_GBPS:.0f} GB/s; ranks: {transport[0]['ranks']})", ""]
    decode = [r for r in results if r["suite"] == "decode"]
    if decode:
        lines += _exchange_rows(decode, "latency (us)")
        lines += [f"(ranks: {decode[0]['ranks']}, hidden {decode[0]['hidden']}, "
                  f"top-{decode[0]['top_k']} of {decode[0]['experts']})", ""]
    gemm = [r for r in results if r["suite"] == "gemm" and r["variant"] != "copy"]
    if gemm:
        lines += ["| M x K x N, G | routing | variant | op | time (ms) | TFLOP/s | vs dense | "
                  "roofline (ms) | vs roofline |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in gemm:
            roofline = r.get("roofline_seconds")
            lines.append(f"| {r['m']} x {r['k']} x {r['n']}, {r['groups']} | {r['routing']} | "
                         f"{r['variant']} | {r['op']} | {_time_cell(r, 1e3, '.3f')} | "
                         f"{_fmt(r['tflop_per_s'], '.4g')} | {_fmt(r['vs_dense'], '.2f')} | "
                         f"{_fmt(None if roofline is None else roofline * 1e3, '.3f')} | "
                         f"{_fmt(r.get('vs_roofline'), '.2f')} |")
        lines += [f"(memory, read + write, {r['op']}: {r['gb_per_s']:.4g} GB/s)" for r in results
                  if r["suite"] == "gemm" and r["variant"] == "copy"]
        lines.append("")
    routing = [r for r in results if r["suite"] == "routing"]
    if routing:
        lines += ["| tokens/rank | E | k | op | time (ms) | vs first E |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['tokens_per_rank']} | {r['experts']} | {r['top_k']} | {r['op']} | "
                  f"{_time_cell(r, 1e3, '.3f')} | {r['vs_first_experts']:.2f} |" for r in routing]
        lines.append(f"(ranks: {routing[0]['ranks']})")
        lines.append("")
    permute = [r for r in results if r["suite"] == "permute"]
    if permute:
        lines += ["| rows x H, k | variant | op | time (us) | GB/s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['rows']} x {r['hidden']}, {r['top_k']} | {r['variant']} | {r['op']} | "
                  f"{_time_cell(r, 1e6, '.1f')} | {_fmt(r['gb_per_s'], '.4g')} |" for r in permute]
        lines.append("")
    quantized = [r for r in results if r["suite"] == "quantize"]
    if quantized:
        lines += ["| op | shape | variant | time (ms) | GB/s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['op']} | {' x '.join(map(str, r['shape']))} | {r['variant']} | "
                  f"{_time_cell(r, 1e3, '.3f')} | {_fmt(r['gb_per_s'], '.4g')} |"
                  for r in quantized]
        lines.append("")
    tune = [r for r in results if r["suite"] == "tune"]
    if tune:
        lines += ["| M x K x N, G | op | configuration | time (ms) | TFLOP/s | picked |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['m']} x {r['k']} x {r['n']}, {r['groups']} | {r['op']} | {r['variant']} | "
                  f"{_time_cell(r, 1e3, '.3f')} | {_fmt(r['tflop_per_s'], '.4g')} | "
                  f"{'yes' if r['picked'] else ''} |" for r in tune]
        lines.append("")
    layer = [r for r in results if r["suite"] == "layer" and r["variant"] != "receive buffer"]
    if layer:
        lines += ["| T/rank, H, F, E, k | variant | fwd+bwd (ms) | dispatched steps (ms) | "
                  "tokens/s | memory (GiB) | vs capacity | over dense floor |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in layer:
            memory = None if r["memory_bytes"] is None else r["memory_bytes"] / 2**30
            shape = (f"{r['tokens_per_rank']}, {r['hidden']}, {r['ffn']}, {r['experts']}, "
                     f"{r['top_k']}" + (f" ({r['model']})" if r.get("model") else ""))
            dispatched = r.get("seconds_dispatched")
            lines.append(f"| {shape} | {r['variant']} | {_time_cell(r, 1e3, '.2f')} | "
                         f"{_fmt(dispatched and dispatched * 1e3, '.2f')} | "
                         f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(memory, '.3g')} | "
                         f"{_times(r.get('vs_capacity'))} | {_times(r.get('over_dense_floor'))} |")
        for r in layer:
            if r.get("breakdown"):
                lines.append(f"({r['variant']}, per step: " + ", ".join(
                    f"{kind} {t['us'] / 1e3:.3g} ms" for kind, t in r["breakdown"].items()) + ")")
        lines.append("")
    buffers = [r for r in results if r.get("variant") == "receive buffer"]
    if buffers:
        lines += ["| EP | receive buffer, dropless (GiB) | capacity 1.25 (GiB) |", "| --- | --- | --- |"]
        lines += [f"| {r['ep']} | {r['dropless_bytes'] / 2**30:.3g} | {r['capacity_1.25_bytes'] / 2**30:.3g} |"
                  for r in buffers]
    return "\n".join(lines)


def write(results: list[dict], environment: dict, out: str, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"environment": environment, "command": command, "results": results}, f, indent=1)
    plot(results, out, on_gpu=environment.get("platform") == "gpu")


def plot(results: list[dict], out: str, on_gpu: bool = True) -> None:
    """Plots of the suites in `results` into `out`; the NVLink line on the transport plot only
    `on_gpu` (elsewhere the measured points would sit at its foot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transport = [r for r in results if r["suite"] == "transport"]
    if transport:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, op in zip(axes, ("dispatch", "combine")):
            for variant in dict.fromkeys(r["variant"] for r in transport):
                points = sorted((r["tokens_per_rank"], r["gb_per_s"]) for r in transport
                                if r["variant"] == variant and r["op"] == op)
                if points:
                    ax.plot(*zip(*points), "o-", label=variant)
            if on_gpu:
                ax.axhline(NVLINK_GBPS, color="k", ls="--", lw=1, label="NVLink one-way limit")
            ax.set(xscale="log", xlabel="tokens per rank", title=op)
        axes[0].set_ylabel("GB/s per rank")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "transport.png"), dpi=120)
        plt.close(fig)
    gemm = [r for r in results if r["suite"] == "gemm" and r["variant"] != "copy"]
    if gemm:
        shapes = list(dict.fromkeys(f"{r['m']}x{r['k']}x{r['n']}\nG={r['groups']} {r['op']}" for r in gemm))
        variants = list(dict.fromkeys(r["variant"] for r in gemm))
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(shapes)), 4))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            values = {f"{r['m']}x{r['k']}x{r['n']}\nG={r['groups']} {r['op']}": r["tflop_per_s"] or 0
                      for r in gemm if r["variant"] == variant}
            ax.bar([j + i * width for j in range(len(shapes))], [values.get(s, 0) for s in shapes],
                   width, label=variant)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
        ax.set(ylabel="TFLOP/s", title="grouped GEMM")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gemm.png"), dpi=120)
        plt.close(fig)
