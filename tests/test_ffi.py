"""The `ffi` transport (jep_kernels.ragged_a2a): bit for bit the `reference` transport, and it
fails clearly instead of hanging."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, make_mesh, put
from routings import KINDS, make_routing

import jep
from jep.transport import ffi
from jep_kernels import ragged_a2a
from jep_kernels.ragged_a2a import build

pytestmark = pytest.mark.skipif(not ffi.runs_on(jep.transport.current_platform()),
                                reason="no compiler for the ffi transport here")


@functools.lru_cache(maxsize=None)
def dispatch_combine(num_ranks, num_experts, capacity, backend, layers=1):
    """jit of dispatch + combine (`layers` times in a scan) with the vjp, for [n, T, ...] arrays."""
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(x, ids, weights):
        def layer(x, _):
            recv_x, group_sizes, handle = jep.dispatch(
                x, ids[0], num_experts=num_experts, axis_name="ep", capacity=capacity,
                backend=backend)
            y = recv_x * (1 + jnp.arange(recv_x.shape[0], dtype=x.dtype)[:, None])
            return jep.combine(y, handle, weights[0]), (recv_x, group_sizes, handle.num_dropped)

        out, (recv_x, group_sizes, dropped) = jax.lax.scan(layer, x[0], length=layers)
        return out[None], recv_x[None], group_sizes[None], dropped[None]

    spec = P("ep")
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 4)

    def run(x, ids, weights, g_out, g_recv):
        (out, recv_x, group_sizes, dropped), vjp = jax.vjp(
            lambda x, w: mapped(x, ids, w), x, weights)
        zeros = tuple(jnp.zeros(a.shape, jax.dtypes.float0) for a in (group_sizes, dropped))
        return (out, recv_x, group_sizes, dropped) + vjp((g_out, g_recv) + zeros)

    jitted = jax.jit(run)
    return lambda *args: jitted(*(put(mesh, a, spec) for a in args))


def assert_same_as_reference(rng, ids, *, num_experts, capacity, dtype=np.float32, layers=1,
                             hidden=7):
    num_ranks, num_tokens, top_k = ids.shape
    local_experts = num_experts // num_ranks
    recv_rows = (num_ranks * num_tokens * min(top_k, local_experts) if capacity is None
                 else local_experts * capacity)
    x = rng.normal(size=(num_ranks, num_tokens, hidden)).astype(dtype)
    weights = rng.random(ids.shape).astype(np.float32)
    g_out = rng.normal(size=x.shape).astype(dtype)
    g_recv = rng.normal(size=(num_ranks, layers, recv_rows, hidden)).astype(dtype)
    args = (x, ids, weights, g_out, g_recv)
    want = dispatch_combine(num_ranks, num_experts, capacity, "reference", layers)(*args)
    got = dispatch_combine(num_ranks, num_experts, capacity, "ffi", layers)(*args)
    names = ("out", "recv_x", "group_sizes", "num_dropped", "dx", "dweights")
    for name, a, b in zip(names, got, want, strict=True):
        if name == "dweights":
            # <g, y> per slot is XLA's own reduction in both programs, and XLA may order its
            # additions differently in two different programs: the sums agree to float32's
            # rounding of their terms (seen: 1e-6 absolute on terms of about 10, on 2 x H200;
            # 1.5e-5 on terms of about 100 on the CPU).
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6 * np.abs(b).max(),
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("num_ranks", range(1, 9))
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_combine_and_gradients_equal_reference_bit_for_bit(rng, num_ranks, kind):
    num_experts = 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=6, top_k=3,
                       num_experts=num_experts)
    assert_same_as_reference(rng, ids, num_experts=num_experts, capacity=None)


@pytest.mark.parametrize("num_ranks", [2, 3, 8])
@pytest.mark.parametrize("capacity", [0, 1, 4])
@pytest.mark.parametrize("kind", ["random", "one_expert"])
def test_with_capacity_equal_reference_bit_for_bit(rng, num_ranks, capacity, kind):
    num_experts = 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=5, top_k=2,
                       num_experts=num_experts)
    assert_same_as_reference(rng, ids, num_experts=num_experts, capacity=capacity)


@pytest.mark.parametrize("num_ranks", [1, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float64])
def test_other_dtypes_equal_reference_bit_for_bit(rng, dtype, num_ranks):
    # 16 hidden bf16/f16 values make one 16-byte word: the GPU kernels' vector path.
    ids = make_routing("random", rng, num_ranks=num_ranks, num_tokens=6, top_k=4,
                       num_experts=2 * num_ranks)
    with jax.enable_x64(dtype == np.float64):
        assert_same_as_reference(rng, ids, num_experts=2 * num_ranks, capacity=None, dtype=dtype,
                                 hidden=16)


def test_inside_scan_every_call_meets_its_own_peers(rng):
    # The same exchange runs three times per execution; each call must pair with the same call
    # on the other devices.
    ids = make_routing("random", rng, num_ranks=4, num_tokens=5, top_k=2, num_experts=8)
    assert_same_as_reference(rng, ids, num_experts=8, capacity=None, layers=3)


def test_moe_on_a_dp_ep_mesh_equals_reference(rng):
    # Two EP groups of four exchange at the same time and must not meet each other.
    config = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(0), hidden=8, ffn=4, config=config)
    params = jax.tree.map(np.asarray, params)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    mesh = make_mesh((2, 4), ("dp", "ep"))
    outs = {}
    for backend in ("reference", "ffi"):
        cfg = dataclasses.replace(config, dispatch=jep.DispatchConfig(backend=backend))
        layer = lambda x, p: jep.moe(x, p, config=cfg, mesh=mesh)[0]  # noqa: E731
        loss = lambda x, p: jnp.sum(layer(x, p) ** 2)  # noqa: E731
        outs[backend] = (jax.jit(layer)(x, params),
                         jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, params))
    (y, (value, grads)), (want_y, (want_value, want_grads)) = outs["ffi"], outs["reference"]
    # The layer's output and every gradient: bit for bit.
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The loss sums the same outputs, but in two different XLA programs, which may split that
    # reduction differently: the last bit may differ.
    np.testing.assert_allclose(value, want_value, rtol=1e-6)


def test_exchange_with_index_reads_rows_by_index(rng):
    num_ranks, num_rows = 4, 6
    send_sizes = rng.integers(0, 3, size=(num_ranks, num_ranks)).astype(np.int32)
    index = rng.integers(-1, num_rows + 1, size=(num_ranks, 2 * num_ranks)).astype(np.int32)
    rows = rng.normal(size=(num_ranks, num_rows, 3)).astype(np.float32)
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(rows, send, index):
        out = ffi.exchange(rows[0], send[0], None, axis_name="ep", out_rows=2 * num_ranks * 2,
                           max_rows_per_peer=2, index=index[0])
        return out[None]

    out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))(
        *(put(mesh, a, P("ep")) for a in (rows, send_sizes, index)))
    out = np.asarray(out)
    padded = np.concatenate([rows, np.zeros((num_ranks, 1, 3), np.float32)], axis=1)
    sent = padded[np.arange(num_ranks)[:, None], np.where((index >= 0) & (index < num_rows),
                                                           index, num_rows)]
    for r in range(num_ranks):
        want = np.concatenate([sent[s, send_sizes[s, :r].sum():][: send_sizes[s, r]]
                               for s in range(num_ranks)])
        np.testing.assert_array_equal(out[r, : len(want)], want)
        np.testing.assert_array_equal(out[r, len(want):], 0)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_exchange_with_expansion_writes_each_received_row_to_its_rows(rng, dtype):
    # The fused expansion against the plain exchange followed by a gather (the reference
    # transport's way): random send sizes and indices, and per rank a random map of the
    # (received row, slot) pairs onto a prefix of the result, the rest sent nowhere.
    num_ranks, num_rows, per_peer, k, hidden = 4, 6, 2, 3, 8
    received, expanded = num_ranks * per_peer, num_ranks * per_peer * k
    send_sizes = rng.integers(0, per_peer + 1, size=(num_ranks, num_ranks)).astype(np.int32)
    index = rng.integers(-1, num_rows + 1, size=(num_ranks, num_ranks * per_peer)).astype(np.int32)
    rows = rng.normal(size=(num_ranks, num_rows, hidden)).astype(dtype)
    dest = np.full((num_ranks, received * k), expanded, np.int32)
    source = np.full((num_ranks, expanded), received, np.int32)
    for r in range(num_ranks):
        pairs = rng.permutation(received * k)
        kept = pairs[: rng.integers(0, received * k - 1)]
        dest[r, kept] = np.arange(len(kept))
        dest[r, pairs[-1]] = -1  # out of range below as well as above
        source[r, dest[r, kept]] = kept // k
    dest = dest.reshape(num_ranks, received, k)
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(backend, rows, send, index, dest, source):
        return jep.transport.exchange(
            backend, rows[0], send[0], jax.lax.all_to_all(send[0], "ep", 0, 0, tiled=True),
            axis_name="ep", out_rows=received, max_rows_per_peer=per_peer, index=index[0],
            expansion=(dest[0], source[0]))[None]

    args = [put(mesh, a, P("ep")) for a in (rows, send_sizes, index, dest, source)]
    got, want = (jax.jit(jax.shard_map(functools.partial(local, backend), mesh=mesh,
                                       in_specs=(P("ep"),) * 5, out_specs=P("ep")))(*args)
                 for backend in ("ffi", "reference"))
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_array_equal(got, want)
    filled = ((dest >= 0) & (dest < expanded)).sum((1, 2))
    assert all(np.all(got[r, filled[r]:] == 0) for r in range(num_ranks))
    assert any(np.any(got[r, : filled[r]] != 0) for r in range(num_ranks))


def test_a_rank_that_never_arrives_raises_after_the_timeout_naming_it():
    # One device calls an exchange among two ranks: rank 1 never comes.
    ragged_a2a.register("cpu")
    call = jax.jit(lambda rows: ragged_a2a.exchange(
        rows, jnp.array([1, 1], jnp.int32), jnp.array([0, 0], jnp.int32), num_ranks=2,
        out_rows=2, timeout_s=0.5, what="test exchange"))
    rows = jax.device_put(np.ones((2, 3), np.float32), jax.devices("cpu")[0])
    with pytest.raises(Exception, match=r"never arrived within 0.5 s: \[1\] of 2.*timeout_s"):
        jax.block_until_ready(call(rows))


def _timeouts_ms(lowered) -> set[int]:
    return {int(m) for m in re.findall(r"timeout_ms = (\d+)", lowered.as_text())}


def test_the_timeout_is_a_setting_of_the_traced_program(monkeypatch):
    monkeypatch.setenv("JEP_FFI_TIMEOUT_S", "7")
    assert ragged_a2a.check_timeout(None) == 7
    assert ragged_a2a.check_timeout(2.5) == 2.5
    for bad in (0, -1, True, "3"):
        with pytest.raises(ValueError, match="timeout_s"):
            ragged_a2a.check_timeout(bad)
    with pytest.raises(ValueError, match="DispatchConfig.timeout_s"):
        jep.DispatchConfig(timeout_s=0)

    mesh = make_mesh((4,), ("ep",))

    def lowered(timeout_s):
        def body(x, ids):
            recv, _, h = jep.dispatch(x, ids, num_experts=8, axis_name="ep", backend="ffi",
                                      timeout_s=timeout_s)
            return jep.combine(recv, h, jnp.ones(ids.shape, x.dtype))
        f = jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        return jax.jit(f).lower(put(mesh, jnp.ones((16, 4)), P("ep")),
                                put(mesh, jnp.zeros((16, 2), jnp.int32), P("ep")))

    # The variable is read when the program is traced: it is the default of every exchange in it.
    assert _timeouts_ms(lowered(None)) == {7000}
    monkeypatch.setenv("JEP_FFI_TIMEOUT_S", "9")
    assert _timeouts_ms(lowered(None)) == {9000}
    assert _timeouts_ms(lowered(2.5)) == {2500}
    with pytest.raises(ValueError, match="timeout_s"):
        lowered(-1)


def test_too_many_ranks_raise_at_trace_time():
    with pytest.raises(ValueError, match="1 to 32 ranks"):
        ragged_a2a.exchange(jnp.ones((2, 3)), jnp.ones((33,), jnp.int32), jnp.zeros(2, jnp.int32),
                            num_ranks=33, out_rows=2)


def test_without_a_compiler_it_is_unavailable_and_names_the_fallback(monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda platform: None)
    assert not ffi.runs_on("cpu")
    assert jep.transport.resolve("auto", "cpu") == "reference"
    with pytest.raises(build.CompilerNotFound, match="g\\+\\+.*backend='reference'"):
        build.library("cpu")
    with pytest.raises(ValueError, match="does not run on 'cpu'.*compiler"):
        jep.transport.resolve("ffi", "cpu")


def test_across_processes_it_runs_only_over_axes_within_one_process(monkeypatch):
    """Two processes of 4 devices as a (node, local) mesh, process = node: ffi runs over
    `local` (each group in one process), not over `node` or both, nor where no mesh is set."""
    from types import SimpleNamespace

    from jax._src import mesh as mesh_lib

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not ffi.runs_on("cpu")
    assert not ffi.runs_on("cpu", "local")  # no mesh set: cannot tell
    devices = np.array([[SimpleNamespace(process_index=p) for _ in range(4)] for p in range(2)])
    mesh = SimpleNamespace(empty=False, axis_names=("node", "local"), devices=devices,
                           shape={"node": 2, "local": 4})
    monkeypatch.setattr(mesh_lib, "get_concrete_mesh", lambda: mesh)
    assert ffi.runs_on("cpu", "local")
    assert not ffi.runs_on("cpu", "node")
    assert not ffi.runs_on("cpu", ("node", "local"))
    assert jep.transport.resolve("auto", "cpu", "local") == "ffi"
    assert jep.transport.resolve("auto", "cpu", "node") == "reference"


def test_build_is_cached_by_source_and_jax_version(tmp_path, monkeypatch):
    monkeypatch.setenv("JEP_KERNELS_CACHE", str(tmp_path))
    first = build.library("cpu")
    assert first.is_relative_to(tmp_path) and first.exists()
    assert build.library("cpu") == first
    monkeypatch.setattr(build, "_key", lambda platform: "another-source")
    assert build.library("cpu") != first
