"""python -m jep.bench: a CPU smoke run of every suite, and the layer baselines are right."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, make_mesh, put

import jep
from jep.bench import __main__ as bench
from jep.bench import layer, workloads


def test_cpu_smoke_run_of_every_suite_writes_json_table_and_plots(tmp_path, capsys):
    results = bench.main(["all", "--tokens", "16", "--hidden", "16", "--ffn", "8", "--experts", "8",
                          "--topk", "2", "--gemm-shapes", "32x16x8x4", "--experts-sweep", "8,16",
                          "--iters", "2", "--repeats", "1",
                          "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["jax"] == jax.__version__ and saved["results"]
    assert {r["suite"] for r in results} == {"transport", "decode", "gemm", "permute", "quantize",
                                             "layer", "routing"}
    assert [r["shape"] for r in results if r["suite"] == "quantize"] == [[8, 16, 8], [8, 8, 16]]
    assert {r["op"] for r in results if r["suite"] == "permute"} == {"expand", "combine", "elementwise"}
    assert {r["op"] for r in results if r["suite"] == "routing"} == {
        "read logits", "route", "layout + stats", "route + layout", "reroute"}
    timed = [r for r in results if "seconds" in r and "error" not in r]
    assert timed and all(r["seconds"] > 0 for r in timed)
    # A variant may refuse a shape (the Pallas kernels on a GPU, these tiny ones): it says why.
    assert all(r["seconds"] is None and r["error"] for r in results if "error" in r)
    variants = {r["variant"] for r in results if r["suite"] == "transport"}
    assert {"jep/reference", "all_to_all padded"} <= variants
    assert {"jep", "jep, 2 chunks", "jep, 4 chunks", "jep exchanges only", "jep experts only",
            "capacity 1.25"} <= {r["variant"] for r in results if r["suite"] == "layer"}
    assert {"jep low-latency", "jep/reference", "all_to_all"} <= {
        r["variant"] for r in results if r["suite"] == "decode"}
    assert (tmp_path / "transport.png").exists() and (tmp_path / "gemm.png").exists()
    assert "GB/s per rank" in capsys.readouterr().out


@pytest.mark.parametrize("routing", workloads.ROUTINGS)
def test_workloads_draw_distinct_experts_and_exact_group_sizes(routing):
    rng = np.random.default_rng(0)
    ids = workloads.expert_ids(routing, rng, (3, 50), 16, 4)
    assert ids.shape == (3, 50, 4) and ids.min() >= 0 and ids.max() < 16
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4))
    sizes = workloads.group_sizes(routing, rng, 1000, 8)
    assert sizes.sum() == 1000 and sizes.min() >= 0
    if routing == "random":  # as a layer's groups come: about M / G each, not all the same
        assert len(set(sizes.tolist())) > 1 and sizes.max() < 250


def test_transport_times_fp8_dispatch_and_counts_its_bytes_as_deepep(tmp_path):
    """With H a multiple of 128 each transport's dispatch is also timed in FP8, its bytes
    counted as DeepEP counts them: H + 4 H / 128 a row against bf16's 2 H."""
    results = bench.main(["transport", "--tokens", "8", "--hidden", "128", "--experts", "8",
                          "--topk", "2", "--iters", "2", "--repeats", "1", "--out", str(tmp_path)])
    dispatch = {r["variant"]: r for r in results if r["op"] == "dispatch"}
    assert "jep/reference fp8" in dispatch and dispatch["jep/reference fp8"]["seconds"] > 0
    for name in [v for v in dispatch if v.endswith(" fp8")]:
        ratio = dispatch[name]["bytes_per_rank"] / dispatch[name[:-4]]["bytes_per_rank"]
        assert ratio == (128 + 4) / (2 * 128), (name, ratio)
    # The quantize pass alone, XLA's (and on Hopper the kernel's), over the rows it reads.
    quantize = {r["variant"]: r for r in results if r["op"] == "quantize"}
    assert quantize["fp8 quantize, XLA fusions"]["seconds"] > 0
    assert quantize["fp8 quantize, XLA fusions"]["bytes_per_rank"] == 8 * 128 * 2


def test_quantize_times_token_rows_and_counts_their_bytes(tmp_path):
    """Rows of H a multiple of 128 are timed too, quantized and packed (FP8 dispatch's pass):
    x read (2 bytes an element), e4m3 and a float32 scale per 128 written."""
    results = bench.main(["quantize", "--tokens", "8,16", "--hidden", "256", "--ffn", "128",
                          "--experts", "2", "--topk", "1", "--iters", "2", "--repeats", "1",
                          "--out", str(tmp_path)])
    rows = [r for r in results if r["op"] == "rows"]
    assert {(r["variant"], tuple(r["shape"])) for r in rows} >= {
        (v, (t, 256)) for v in ("jep.fp8 (XLA)", "jep.fp8.pack_rows (XLA)") for t in (8, 16)}
    assert all(r["bytes"] == r["shape"][0] * (256 * 3 + 2 * 4) and r["seconds"] > 0
               for r in rows)
    # Along the rows, in 2 groups (the experts): each group's rows from a tile of 128 of their
    # own, 3 tiles in the layout (`jep.fp8.padded_rows`), a float32 scale per tile and channel.
    columns = [r for r in results if r["op"] == "columns, 2 groups"]
    assert {(r["variant"], tuple(r["shape"])) for r in columns} >= {
        ("jep.fp8 (XLA)", (t, 256)) for t in (8, 16)}
    assert all(r["bytes"] == r["shape"][0] * 256 * 2 + 384 * 256 + 3 * 256 * 4
               and r["seconds"] > 0 for r in columns)
    assert [r["shape"] for r in results if r["op"].startswith("weight")] == [[2, 256, 128],
                                                                             [2, 128, 256]]


def test_capacity_baseline_without_drops_equals_the_reference(rng):
    mesh = make_mesh((4,), ("ep",))
    config = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(0), hidden=8, ffn=12, config=config)
    params["router"] = params["router"] * 50
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)

    def local(x, router, w_gate, w_up, w_down):
        # A capacity factor of E: no (rank, expert) pair can overflow.
        return layer.capacity_moe(x, router, w_gate, w_up, w_down, top_k=2, capacity_factor=8.0)

    y = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("ep"), P(), P("ep"), P("ep"), P("ep")),
                              out_specs=P("ep")))(
        put(mesh, x, P("ep")), put(mesh, params["router"], P()),
        *(put(mesh, params[k], P("ep")) for k in ("w_gate", "w_up", "w_down")))
    want, _ = jep.reference.moe(x, params, config=config)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_receive_buffer_rows_are_the_worst_case_and_the_capacity():
    rows = layer.receive_buffer_rows(tokens=4096, experts=256, top_k=8, ep=4)
    assert rows == {"dropless": 4 * 4096 * 8, "capacity_1.25": 64 * 4 * 160}


def test_ragged_baseline_equals_the_reference():
    if not jep.transport.xla.runs_on(jep.transport.current_platform()):
        pytest.skip("the ragged baseline needs lax.ragged_all_to_all (GPU/TPU)")
    n = min(4, len(jax.devices()))
    mesh = make_mesh((n,), ("ep",))
    config = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(0), hidden=8, ffn=12, config=config)
    params["router"] = params["router"] * 50
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8 * n, 8)), jnp.float32)
    y = jax.jit(jax.shard_map(
        lambda *a: layer.ragged_moe(*a, top_k=2), mesh=mesh,
        in_specs=(P("ep"), P(), P("ep"), P("ep"), P("ep")), out_specs=P("ep")))(
        put(mesh, x, P("ep")), put(mesh, params["router"], P()),
        *(put(mesh, params[k], P("ep")) for k in ("w_gate", "w_up", "w_down")))
    want, _ = jep.reference.moe(x, params, config=config)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_two_level_transport_measures_both_modes_and_counts_the_node_bytes(tmp_path):
    if len(jax.devices()) % 2:
        pytest.skip("two nodes need an even number of devices")
    results = bench.main(["transport", "--nodes", "2", "--tokens", "8", "--hidden", "16",
                          "--experts", "16", "--topk", "4", "--iters", "1", "--repeats", "1",
                          "--out", str(tmp_path)])
    modes = {r["variant"].split()[-1] for r in results}
    assert modes == {"flat", "hierarchical"} and {r["op"] for r in results} == {"dispatch", "combine"}
    crossing = {r["variant"]: r["node_bytes_per_rank"] for r in results}
    for variant, node_bytes in crossing.items():
        if variant.endswith("hierarchical"):
            # Once per (token, other node) is never more than once per (token, other rank).
            assert 0 < node_bytes <= crossing[variant.replace("hierarchical", "flat")]


def test_rotated_loop_calls_each_rotation_in_turn():
    from jep.bench import timing

    a, b = jnp.arange(1.0, 5.0), jnp.full((4,), 10.0)
    total = jax.jit(lambda v: timing.repeat_rotated(lambda x: x * 2, v, 5))([(a,), (b,)])
    # Calls a, b, a, b, a: one element of each call's output, and of the last one again.
    assert float(total) == 2 * (3 * a[0] + 2 * b[0]) + 2 * a[0]
    seconds = timing.seconds_interleaved(
        {"ok": (jax.jit(lambda x: x + 1), (a,)), "bad": (lambda x: 1 / "x", (a,))},
        iters=2, repeats=3)
    assert seconds["ok"] > 0 and isinstance(seconds["bad"], TypeError)


def test_interleaved_rounds_take_every_run_once_in_varying_order():
    from jep.bench import timing

    calls = []
    runs = {name: (lambda name=name: calls.append(name), ()) for name in "abcd"}
    timing.seconds_interleaved(runs, iters=1, repeats=12)
    assert calls[:4] == list("abcd")  # the warm-up calls
    rounds = [tuple(calls[i:i + 4]) for i in range(4, len(calls), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 1  # not always the same order (12 draws of 24 orders)


def test_min_seconds_repeats_each_sample_until_it_lasts_that_long(monkeypatch):
    from jep.bench import timing

    # A clock that only the timed call moves, by a step exact in binary: a loaded machine's
    # sleeps run long and would make the number of calls vary.
    step, clock, calls = 2.0**-9, [0.0], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def nap():
        calls.append(None)
        clock[0] += step

    seconds = timing.seconds_interleaved({"nap": (nap, ())}, iters=1, repeats=2,
                                         min_seconds=10 * step)
    assert len(calls) == 2 + 2 * 10  # warm-up, the estimate, then 10 per sample
    assert seconds["nap"] == step


def benchmark_script(name: str):
    """benchmarks/scripts/NAME.py loaded as a module (a script folder, not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_dispatch_pieces_script_times_every_piece():
    script = benchmark_script("dispatch_pieces")
    times = script.main(["--tokens", "8", "--hidden", "16", "--experts", "16", "--topk", "2",
                         "--iters", "2", "--repeats", "1", "--backends", "reference"])
    assert len(times) == 9 and all(seconds > 0 for seconds in times.values())


def test_pack_profile_script_runs_each_pack_pass_and_dispatch(tmp_path):
    """benchmarks/scripts/pack_profile.py on the CPU: the reference's pack pass and the bf16
    and FP8 dispatch of every transport that runs here are each called under the profiler (no
    device streams on the CPU, so no figures), and the JSON is written."""
    script = benchmark_script("pack_profile")
    out = tmp_path / "pack.json"
    times = script.main(["--tokens", "64", "--hidden", "1024", "--experts", "16", "--topk", "2",
                         "--calls", "1", "--out", str(out)])
    assert json.loads(out.read_text())["device_us_per_call"] == times
    assert {"pack, XLA's fusions", "dispatch reference", "dispatch reference fp8",
            "dispatch ffi", "dispatch ffi fp8"} <= set(times)
    assert all(us is None for us in times.values())  # the CPU: no device events


def test_buffer_fill_script_profiles_both_buffers_and_their_gradients_agree():
    """benchmarks/scripts/buffer_fill.py on the CPU: the experts' forward and backward in bf16
    and FP8 over a full buffer and one four times its rows are each profiled (no device
    streams on the CPU, so no figures), and the weights' gradients of the two buffers agree:
    the rows past the groups take no part."""
    script = benchmark_script("buffer_fill")
    totals, differences = script.main(["--tokens", "32", "--topk", "2", "--experts", "4",
                                       "--hidden", "256", "--ffn", "128", "--fill", "4"])
    assert set(totals) == {("bf16", 1), ("bf16", 4), ("fp8", 1), ("fp8", 4)}
    assert all(t == {} for t in totals.values())  # the CPU: no device events
    assert set(differences) == {"bf16", "fp8"} and max(differences.values()) < 1e-2


def test_buffer_fill_takes_the_gated_fp8_kernel_only_inside_its_context():
    """buffer_fill.py --fp8-gated: inside `gated_fp8_kernel` the experts find an "fp8_gated"
    entry (the kernel's default) for a shape the table has none for, other ops' entries as
    they were; after it, the table's answers again."""
    import jep_kernels.grouped_matmul.tuning as tuning

    script = benchmark_script("buffer_fill")
    shape = (7168, 2048, 32)
    assert tuning.entry_for(tuning.FP8_GATED, *shape) is None
    fp8_entry = tuning.entry_for(tuning.FP8, *shape)
    with script.gated_fp8_kernel():
        assert tuning.entry_for(tuning.FP8_GATED, *shape) == tuning.default(
            tuning.FP8_GATED, *shape[:2])
        assert tuning.entry_for(tuning.FP8, *shape) == fp8_entry
    assert tuning.entry_for(tuning.FP8_GATED, *shape) is None


def test_tune_times_the_candidates_beside_the_dense_matmul_and_picks_the_fastest(monkeypatch):
    """The tune suite on the CPU, its kernels in Pallas's GPU interpret mode, dw only, two
    candidates: each is timed, the dense matmul is timed beside them and never picked, and the
    pick is the faster candidate."""
    from jep.bench import tune
    from jep_kernels.grouped_matmul import mgpu, tuning

    configs = [mgpu.DwConfig(block_k=64, block_n=128, block_rows=64, max_concurrent_steps=2),
               mgpu.DwConfig(block_k=128, block_n=128, block_rows=64, max_concurrent_steps=2)]
    monkeypatch.setattr(tuning, "candidates", lambda op, k, n: configs)
    results, picks = tune.measure(shapes=[(96, 128, 128, 3)], dtype=jnp.bfloat16,
                                  routing="zipf", iters=1, repeats=1, ops=("dw",),
                                  interpret=True)
    assert [r["variant"] for r in results] == [tune._describe("dw", c)
                                               for c in configs] + ["dense matmul"]
    assert all(r["seconds"] > 0 and r["op"] == "dw" for r in results)
    fastest = min(results[:2], key=lambda r: r["seconds"])
    assert list(picks) == [tuning.key("dw", 128, 128, 3)]
    assert [r["picked"] for r in results] == [r is fastest for r in results[:2]] + [False]


@pytest.mark.parametrize("op", ["forward", "dx", "dw", "fp8", "dw_fp8", "dx_sum", "gated",
                                "fp8_gated", "dw_fp8_pair"])
def test_tune_names_every_candidate_apart(op):
    """The tune suite keys its runs by the candidates' names: two configurations with one name
    would time one of them only (ping-pong copies of the dw candidates once were)."""
    from jep.bench import tune
    from jep_kernels.grouped_matmul import tuning

    for k, n in ((7168, 2048), (2048, 7168), (2048, 768), (768, 2048)):
        found = tuning.candidates(op, k, n)
        names = [tune._describe(op, c) for c in found]
        assert found and len(set(names)) == len(names) == len(set(map(repr, found)))


@pytest.mark.slow
@pytest.mark.parametrize("op, shape, key_k, key_n", [
    ("dx_sum", (96, 128, 64, 3), 64, 128),   # keyed as dx is: its own K and N
    ("gated", (96, 128, 128, 3), 128, 128),  # keyed as the forward is
    ("fp8_gated", (96, 128, 128, 3), 128, 128),  # keyed as the FP8 forward is
])
def test_tune_times_the_ops_on_two_weights(monkeypatch, op, shape, key_k, key_n):
    """The summed dx ("dx_sum") and the gated kernels ("gated", "fp8_gated") tuned on the CPU
    in interpret mode: each candidate runs on a pair of weights, counted at the flops of two
    products."""
    from jep.bench import tune
    from jep_kernels.grouped_matmul import mgpu, tuning

    config = mgpu.Config(block_m=128, block_n=64, block_k=128 if op == "fp8_gated" else 64,
                         max_concurrent_steps=2, warp_specialized=True, across_tiles=True)
    monkeypatch.setattr(tuning, "candidates", lambda op, k, n: [config])
    results, picks = tune.measure(shapes=[shape], dtype=jnp.bfloat16, routing="zipf", iters=1,
                                  repeats=1, ops=(op,), interpret=True)
    assert [r["variant"] for r in results] == [tune._describe(op, config)]
    (r,) = results
    m, k, n, groups = shape
    assert r["picked"] and r["tflop_per_s"] == pytest.approx(4 * m * k * n / r["seconds"] / 1e12)
    assert picks == {tuning.key(op, key_k, key_n, groups): config}


@pytest.mark.slow
def test_tune_times_the_fp8_weight_gradient_beside_the_bf16_one(monkeypatch):
    """"dw_fp8" tuned on the CPU in interpret mode: each candidate on x and dy quantized along
    the rows before the loop, the table's bf16 dw timed beside them and never picked; the pick
    keyed as "dw" is, and taken by the kernel's wrapper where no config is given."""
    import jep_kernels.grouped_matmul as gm
    from jep.bench import tune
    from jep_kernels.grouped_matmul import tuning

    config = gm.DwConfig(block_k=128, block_n=64, block_rows=128, max_concurrent_steps=2,
                         warp_specialized=True)
    monkeypatch.setattr(tuning, "candidates", lambda op, k, n: [config])
    results, picks = tune.measure(shapes=[(96, 128, 128, 3)], dtype=jnp.bfloat16,
                                  routing="zipf", iters=1, repeats=1, ops=("dw_fp8",),
                                  interpret=True)
    assert [r["variant"] for r in results] == [tune._describe("dw_fp8", config),
                                               "bf16 dw (the table's)"]
    assert all(r["seconds"] > 0 for r in results)
    assert [r["picked"] for r in results] == [True, False]
    assert picks == {tuning.key("dw_fp8", 128, 128, 3): config}
    monkeypatch.setattr(tuning, "_table", lambda: {tuning.key("dw_fp8", 256, 128, 4): config})
    assert tuning.config_for("dw_fp8", 256, 128, 8) == config
    assert tuning.config_for("dw_fp8", 512, 128, 8) == gm.dw_fp8.DW_FP8_CONFIG
    # The gate and up weight gradients in one kernel: timed on a pair of dy, at the flops of
    # two products.
    results, picks = tune.measure(shapes=[(96, 128, 128, 3)], dtype=jnp.bfloat16,
                                  routing="zipf", iters=1, repeats=1, ops=("dw_fp8_pair",),
                                  interpret=True)
    (r,) = results
    assert r["variant"] == tune._describe("dw_fp8_pair", config) and r["picked"]
    assert r["tflop_per_s"] == pytest.approx(4 * 96 * 128 * 128 / r["seconds"] / 1e12)
    assert picks == {tuning.key("dw_fp8_pair", 128, 128, 3): config}


def test_unrolled_calls_take_each_rotation_in_turn():
    from jep.bench import timing

    a, b = jnp.arange(1.0, 5.0), jnp.full((4,), 10.0)
    total = jax.jit(lambda v: timing.repeat_unrolled(lambda x: x * 2, v, 5))([(a,), (b,)])
    assert float(total) == 2 * (3 * a[0] + 2 * b[0])  # one element of each call's output


def test_profile_summary_counts_busy_time_and_overlap_per_device():
    from jep.bench import profile

    events = [  # stream 1 busy 0-10 and 20-30, stream 2 busy 5-25: overlap 5 + 5
        {"device": "/device:GPU:0", "stream": "1", "name": "gemm", "start": 0.0, "duration": 10.0},
        {"device": "/device:GPU:0", "stream": "1", "name": "gemm", "start": 20.0, "duration": 10.0},
        {"device": "/device:GPU:0", "stream": "2", "name": "all-to-all", "start": 5.0,
         "duration": 20.0},
    ]
    text = profile.summary(events)
    assert "30.0 us from first to last kernel, busy 30.0 us, overlapped 10.0 us" in text
    assert "stream 1: busy 20.0 us, 2 kernels" in text and "x2" in text


def test_profile_finds_the_idle_time_between_kernels():
    from jep.bench import profile

    def kernel(name, start, duration, stream="1", graph=None):
        return {"device": "/device:GPU:0", "stream": stream, "name": name, "start": start,
                "duration": duration, "args": {"cuda_graph_id": graph} if graph else {}}

    # a 0-10, b 12-20 on another stream, c 14-16 inside b, d 120-130: idle 2 and 100 us.
    # a and b from graph 7, c on its own, d from graph 7 again: two launches of one graph.
    events = [kernel("a", 0.0, 10.0, graph=7), kernel("b", 12.0, 8.0, "2", graph=7),
              kernel("c", 14.0, 2.0), kernel("d", 120.0, 10.0, graph=7)]
    assert profile.idle_gaps(events) == [(2.0, "a", "b"), (100.0, "b", "d")]
    text = profile.summary(events)
    assert "launched: 2 CUDA graph launches (1 graphs), 1 of 4 kernels on their own" in text
    assert "idle 102.0 us in 2 gaps: 0 of 0-2 us, 1 of 2-5 us" in text
    assert "1 of 100 us or more" in text and "idle    100.0 us after b [7] before d [7]" in text
    assert profile.idle_gaps(events[:1]) == []


def test_rooflines_take_the_larger_ceiling_and_sum_the_backward():
    from jep.bench import gemm

    shape = dict(m=1000, k=200, n=100, groups=4, routing="uniform", itemsize=2)
    results = [dict(shape, suite="gemm", variant=variant, op=op, seconds=seconds)
               for variant, op, seconds in [
                   ("dense matmul", "forward", 1e-3), ("dense matmul", "dx", 1e-3),
                   ("dense matmul", "dw", 1e-6),
                   ("jep", "forward", 2e-3), ("jep", "dx", 4e-3), ("jep", "dw", 1e-3)]]
    moved = (1000 * 200 + 4 * 200 * 100 + 1000 * 100) * 2  # x, w and y once: 760 kB
    backward = gemm.add_rooflines(results, bytes_per_second=moved / 5e-4)  # 0.5 ms of bytes
    jep = {r["op"]: r for r in results + backward if r["variant"] == "jep"}
    # forward and dx: the dense matmul's 1 ms is the larger; dw: the bytes' 0.5 ms.
    assert jep["forward"]["roofline_seconds"] == pytest.approx(1e-3)
    assert jep["forward"]["vs_roofline"] == pytest.approx(0.5)
    assert jep["dw"]["roofline_seconds"] == pytest.approx(5e-4)
    assert jep["dx + dw"]["seconds"] == pytest.approx(5e-3)
    assert jep["dx + dw"]["roofline_seconds"] == pytest.approx(1.5e-3)
    assert jep["dx + dw"]["vs_roofline"] == pytest.approx(0.3)
    assert all(r["roofline_seconds"] is None for r in results if r["variant"] == "dense matmul")


def test_gemm_times_only_the_peers_asked_for():
    from jep.bench import gemm

    results = gemm.measure(shapes=[(64, 16, 8, 4)], dtype=jnp.float32, routing="uniform",
                           iters=1, repeats=1, peers=())
    timed = {r["variant"] for r in results if r["variant"] != "copy"}
    assert timed == {"jep", "dense matmul"}
    assert bench.parse_args(["gemm", "--gemm-peers", "none"]).gemm_peers == []
    assert bench.parse_args(["gemm"]).gemm_peers == list(gemm.PEERS)
    with pytest.raises(SystemExit):
        bench.parse_args(["gemm", "--gemm-peers", "cublas"])
    with pytest.raises(ValueError, match="peers must be among"):
        gemm.measure(shapes=[], dtype=jnp.float32, routing="uniform", iters=1, repeats=1,
                     peers=("cublas",))


def test_model_presets_set_the_layer_shape():
    args = bench.parse_args(["layer", "--model", "qwen3-30b-a3b", "--hidden", "16"])
    assert (args.hidden, args.ffn, args.experts, args.topk) == (2048, 768, 128, 8)
    assert bench.parse_args(["layer"]).hidden == 7168  # no preset: the flags
    with pytest.raises(SystemExit):
        bench.parse_args(["layer", "--layer-variants", "jep,nothing"])


def test_layer_times_the_variants_asked_for_against_the_dense_floor():
    results = layer.measure(tokens=16, hidden=16, ffn=8, experts=8, top_k=2, dtype=jnp.float32,
                            iters=1, repeats=1, groups=("jep", "floor"), model="test")
    timed = {r["variant"]: r for r in results if r["variant"] != "receive buffer"}
    assert set(timed) == {"jep", "dense floor"}
    assert timed["dense floor"]["over_dense_floor"] == pytest.approx(1.0)
    assert timed["jep"]["over_dense_floor"] == pytest.approx(
        timed["jep"]["seconds"] / timed["dense floor"]["seconds"])
    assert timed["jep"]["vs_capacity"] is None and timed["jep"]["model"] == "test"
    assert timed["jep"]["seconds_dispatched"] > 0
    assert timed["jep"]["over_dense_floor_dispatched"] == pytest.approx(
        timed["jep"]["seconds_dispatched"] / timed["dense floor"]["seconds_dispatched"])


def test_dense_floor_is_one_swiglu_with_the_first_expert():
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    want = (jax.nn.silu(rows @ w_gate[0]) * (rows @ w_up[0])) @ w_down[0]
    np.testing.assert_allclose(layer.dense_floor(rows, None, w_gate, w_up, w_down), want,
                               rtol=1e-6)


def test_profile_report_runs_a_jitted_function_compiled_once_and_a_compiled_one(capsys):
    """`profile.report` takes a jitted run (compiled for its args, and that program is what
    runs) or a compiled one; on the CPU there are no device streams, so no breakdown."""
    from jep.bench import profile

    run = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.ones((8,), jnp.float32)
    assert profile.report(run, (x,), "jitted") == {}
    assert profile.report(run.lower(x).compile(), (x,), "compiled") == {}
    assert capsys.readouterr().out.count("no device events") == 2


def test_profile_breakdown_finds_each_kind_by_its_scope():
    """The layer's ops carry the scopes the breakdown looks for (read from the compiled HLO of
    a step on the CPU: a jitted step is compiled for its arguments, as `report` does; a compiled
    one is taken as it is), and events are counted by the kind of the instruction behind
    them."""
    from jep.bench import profile

    mesh = make_mesh((4,), ("ep",))
    config = jep.MoEConfig(num_experts=8, top_k=2, axis_name="ep")
    params = jep.init_params(jax.random.key(0), hidden=16, ffn=8, config=config)
    x = jnp.ones((64, 16), jnp.float32)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(jep.moe(x, p, config=config, mesh=mesh)[0] ** 2)))
    compiled = profile.compiled_program(step, (params, x))
    assert profile.compiled_program(step, (params, x), compiled) is compiled
    assert profile.compiled_program(compiled, (params, x)) is compiled
    names = profile.op_names(compiled)
    found = {profile.kind_of({"name": "k", "args": {"hlo_op": op}}, names) for op in names}
    assert {"routing and layout", "permutes", "exchange", profile.OTHER} <= found

    names = {"fusion.1": "jit(f)/jep_grouped_dw/pallas_call", "fusion.2": "jit(f)/jep_route/top_k",
             "copy.3": "jit(f)/transpose(jvp(f))/mul"}
    events = [{"device": "/device:GPU:0", "name": "k", "duration": us, "args": {"hlo_op": op}}
              for op, us in [("fusion.1", 30.0), ("fusion.1", 10.0), ("fusion.2", 4.0),
                             ("copy.3", 6.0), ("unknown.9", 2.0)]]
    events.append({"device": "/device:GPU:1", "name": "k", "duration": 99.0,
                   "args": {"hlo_op": "fusion.1"}})  # another device: not counted
    # Kernels in a command buffer (a CUDA graph): hlo_op names the buffer. An XLA fusion's
    # kernel is named after it ("." as "_"), jep's Pallas kernels after their scope.
    names |= profile.op_names('  %loop_fusion.7 = f32[4]{0} fusion(%p), kind=kLoop, '
                              'metadata={op_name="jit(f)/jep_permute/gather"}')
    in_graph = {"hlo_op": "command_buffer_1"}
    events += [{"device": "/device:GPU:0", "name": "loop_fusion_7", "duration": 8.0,
                "args": in_graph},
               {"device": "/device:GPU:0", "name": "jep_grouped_dx_mosaic_gpu_kernel",
                "duration": 12.0, "args": in_graph}]
    totals = profile.breakdown(events, names, steps=2)
    assert totals["grouped dw"] == {"us": 20.0, "kernels": 1.0}
    assert totals["grouped dx"] == {"us": 6.0, "kernels": 0.5}
    assert totals["permutes"] == {"us": 4.0, "kernels": 0.5}
    assert totals["routing and layout"]["us"] == 2.0
    assert totals[profile.OTHER] == {"us": 4.0, "kernels": 1.0}
    assert totals["total"]["us"] == 36.0
    assert "grouped dw" in profile.breakdown_table(totals)


def test_grouped_products_run_under_their_scopes():
    from jep import fp8
    from jep.bench import profile
    import jep_kernels.grouped_matmul as gm

    x = jnp.ones((64, 128), jnp.bfloat16)
    w = jnp.ones((2, 128, 128), jnp.bfloat16)
    sizes = jnp.array([30, 34], jnp.int32)
    config = gm.Config(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)
    dw_config = gm.DwConfig(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2)
    loss = lambda x, w: jnp.sum(gm.grouped_matmul(  # noqa: E731
        x, w, sizes, config=config, dw_config=dw_config, interpret=True).astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text(debug_info=True)
    x_q, x_scales = fp8.quantize_rows(x)
    weight = fp8.quantize_weight(w)
    text += jax.jit(lambda x_q, x_scales, q, scales: gm.grouped_matmul_fp8(
        x_q, x_scales, q, scales, sizes, interpret=True)).lower(
        x_q, x_scales, weight.q_t, weight.scales_t).as_text(debug_info=True)
    columns = fp8.quantize_columns(x, sizes)
    text += jax.jit(lambda a, b: gm.grouped_matmul_dw_fp8(
        *a, *b, sizes, num_rows=64, interpret=True)).lower(columns, columns).as_text(
        debug_info=True)
    kinds = {"forward": "grouped forward", "dx": "grouped dx", "dw": "grouped dw",
             "fp8": "grouped FP8 (forward and dx)", "dw_fp8": "grouped FP8 dw"}
    for op, scope in gm.SCOPES.items():
        assert scope in text
        # ... and the breakdown takes an op under that scope for that product.
        kind = profile.kind_of({"name": "k", "args": {"hlo_op": "c.1"}}, {"c.1": f"f/{scope}/p"})
        assert kind == kinds[op]


# Interprets three kernels (20-30 s on 2 cores): the slow job, and every GPU visit (-m "").
@pytest.mark.slow
def test_gemm_fp8_kernels_compute_the_products_they_time():
    """"jep fp8 kernels" (the FP8 kernels on operands quantized before the loop; interpreted
    off Hopper) against "jep fp8"'s forward, dx and dw (emulated on the CPU, quantizing in the
    step as the layer does): the same quantization, so equal to float32 rounding; the empty
    group's dw is zero and the rows past the groups stay zero."""
    from jep import fp8
    from jep.bench import gemm

    rng = np.random.default_rng(11)
    m, k, n, sizes = 144, 128, 128, jnp.asarray([0, 100, 30], jnp.int32)
    x = jnp.asarray(rng.normal(size=(m, k)) * np.exp(rng.normal(size=(m, 1))), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, k, n)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    operands = gemm.quantized_operands(x, dy, sizes, fp8.quantize_weight(w))
    # On Hopper both run the kernels; their tensor cores sum each 128-deep block in fewer bits.
    hopper = jep.experts.fp8_backend(x, w.shape) == "pallas"
    kernels, bound = gemm._fp8_kernel_ops(interpret=not hopper), 1e-3 if hopper else 1e-5
    for op, body in gemm._fp8_ops().items():
        want = np.asarray(body(x, w, dy, sizes, operands["w"]), np.float64)
        got = np.asarray(kernels[op](x, w, dy, sizes, operands), np.float64)
        assert got.shape == want.shape, op
        np.testing.assert_allclose(got, want, rtol=bound, atol=bound * np.abs(want).max(),
                                   err_msg=op)
        if op == "dw":
            assert not got[0].any() and got[1:].any(axis=(1, 2)).all()
        else:
            assert not got[130:].any() and np.abs(got[:130]).max() > 0


def test_gemm_dense_fp8_computes_the_products_it_times():
    """"dense fp8": each op's two operands laid out K-major, so that the product is the dense
    one of the same flops: against float64 of its e4m3 operands."""
    from jep.bench import gemm

    rng = np.random.default_rng(12)
    x, w, dy = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                for shape in ((96, 64), (2, 64, 32), (96, 32)))
    x8, w8, dy8 = (np.asarray(a.astype(jnp.float8_e4m3fn), np.float64) for a in (x, w[0], dy))
    dense = gemm.dense_fp8_operands(x, w, dy)
    for op, want in {"forward": x8 @ w8, "dx": dy8 @ w8.T, "dw": x8.T @ dy8}.items():
        got = gemm.dense_fp8(*dense[op])
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape, op
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2,
                                   atol=1e-2 * np.abs(want).max(), err_msg=op)
