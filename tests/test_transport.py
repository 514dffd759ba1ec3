"""Transports move exactly the rows they are told to, and the registry picks and refuses well."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, make_mesh, put

import jep
from jep.transport import xla


@pytest.mark.parametrize("backend", jep.transport.available())
@pytest.mark.parametrize("num_ranks", [1, 3, 8])
def test_exchange_delivers_each_peers_rows_in_order(rng, backend, num_ranks):
    block = 6
    # send_sizes[s, p]: rows rank s sends to peer p, some of them zero.
    send_sizes = rng.integers(0, block + 1, size=(num_ranks, num_ranks)).astype(np.int32)
    send_sizes[0, :] = 0  # a rank that sends nothing
    recv_sizes = np.ascontiguousarray(send_sizes.T)
    in_rows, out_rows = num_ranks * block, num_ranks * block + 2
    rows = rng.normal(size=(num_ranks, in_rows, 3)).astype(np.float32)
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(rows, send, recv):
        out = jep.transport.get(backend)(rows[0], send[0], recv[0], axis_name="ep",
                                         out_rows=out_rows, max_rows_per_peer=block)
        return out[None]

    spec = P("ep")
    out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))(
        put(mesh, rows, spec), put(mesh, send_sizes, spec), put(mesh, recv_sizes, spec))
    out = np.asarray(out)
    for r in range(num_ranks):
        want = [rows[s, send_sizes[s, :r].sum():][: send_sizes[s, r]] for s in range(num_ranks)]
        want = np.concatenate(want)
        np.testing.assert_array_equal(out[r, : len(want)], want)
        np.testing.assert_array_equal(out[r, len(want):], 0)


@pytest.mark.parametrize("num_slices", [1, 4, 7])
def test_xla_split_covers_each_range_in_order(rng, num_slices):
    sizes = jnp.asarray(rng.integers(0, 20, size=5), jnp.int32)
    offsets = jnp.cumsum(sizes) - sizes
    piece_sizes, piece_offsets = xla._split(sizes, offsets, num_slices)
    piece_sizes = np.asarray(piece_sizes).reshape(5, num_slices)
    piece_offsets = np.asarray(piece_offsets).reshape(5, num_slices)
    np.testing.assert_array_equal(piece_sizes.sum(1), sizes)
    assert piece_sizes.max(1).tolist() == [-(-int(s) // num_slices) for s in sizes]
    np.testing.assert_array_equal(piece_offsets[:, 0], offsets)
    np.testing.assert_array_equal(piece_offsets[:, 1:], (piece_offsets + piece_sizes)[:, :-1])


def test_auto_picks_xla_on_gpu_and_ffi_or_reference_on_cpu(monkeypatch):
    from jep_kernels.ragged_a2a import build

    on_cpu = "ffi" if jep.transport.ffi.runs_on("cpu") else "reference"
    assert jep.transport.resolve("auto", "cpu") == on_cpu
    assert jep.transport.resolve("auto", "gpu") == "xla"
    assert jep.transport.resolve("auto", "tpu") == "xla"
    monkeypatch.setattr(build, "compiler", lambda platform: None)
    assert jep.transport.resolve("auto", "cpu") == "reference"


def test_ffi_runs_on_gpus_only_where_they_reach_each_other(monkeypatch):
    from jep_kernels import ragged_a2a
    from jep_kernels.ragged_a2a import build

    monkeypatch.setattr(build, "compiler", lambda platform: "/usr/bin/" + platform)
    for reachable in (True, False):  # GPUs with and without peer access
        monkeypatch.setattr(ragged_a2a, "gpus_reach_each_other", lambda r=reachable: r)
        assert jep.transport.ffi.runs_on("gpu") is reachable
    with pytest.raises(ValueError, match="peer access"):
        jep.transport.resolve("ffi", "gpu")


def test_unknown_or_unavailable_backend_raises():
    with pytest.raises(ValueError, match="one of"):
        jep.transport.resolve("carrier-pigeon", "cpu")
    with pytest.raises(ValueError, match="does not run on 'cpu'.*backend='reference'"):
        jep.transport.resolve("xla", "cpu")


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_xla_transport_traces_through_dispatch_combine_and_their_gradients(monkeypatch, num_ranks):
    # Traced only (XLA:CPU cannot compile ragged_all_to_all). Under shard_map's check_vma the
    # exchanged rows must be typed as varying over the mesh axis, or the custom_vjp rules reject
    # their cotangents.
    monkeypatch.setattr(xla, "runs_on", lambda platform, axis_name=None: True)
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(x, weights):
        ids = jnp.zeros((x.shape[0], 1), jnp.int32)
        recv_x, _, handle = jep.dispatch(x, ids, num_experts=2 * num_ranks, axis_name="ep",
                                         backend="xla")
        return jep.combine(recv_x * 2, handle, weights)

    def loss(x, weights):
        return jax.shard_map(local, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))(x, weights).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
        put(mesh, np.zeros((4 * num_ranks, 3), np.float32), P("ep")),
        put(mesh, np.ones((4 * num_ranks, 1), np.float32), P("ep")))
    # On one rank nothing crosses: no exchange at all.
    assert ("ragged_all_to_all" in str(jaxpr)) == (num_ranks > 1)


@pytest.mark.parametrize("backend", jep.transport.available())
def test_one_rank_gathers_in_place_what_an_exchange_would_deliver(rng, backend):
    num_rows, out_rows, sent = 9, 8, 6
    rows = rng.normal(size=(num_rows, 3)).astype(np.float32)
    index = np.array([4, 0, 8, -1, 2, 12, 7, 3], np.int32)  # -1 and 12: a zero row is sent
    source = np.array([5, 0, 7, 1, -1, 3, 9], np.int32)  # 7, 9: past what arrived; -1: none
    slot_row = np.array([[0, 5], [2, 7], [1, 1]], np.int32)
    slot_mask = np.array([[True, True], [True, True], [False, True]])
    mesh = make_mesh((1,), ("ep",))
    sizes = jnp.array([sent], jnp.int32)

    def local(rows):
        moved = jep.transport.exchange(backend, rows, sizes, sizes, axis_name="ep",
                                       out_rows=out_rows, max_rows_per_peer=num_rows,
                                       index=jnp.asarray(index),
                                       expansion=(None, jnp.asarray(source)))
        summed = jep.transport.exchange_sum(backend, rows, sizes, sizes, jnp.asarray(slot_row),
                                            jnp.asarray(slot_mask), axis_name="ep",
                                            out_rows=out_rows, max_rows_per_peer=num_rows)
        return moved, summed

    moved, summed = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P()))(rows)
    padded = np.concatenate([rows, np.zeros((1, 3), np.float32)])
    arrived = padded[np.where((index >= 0) & (index < num_rows), index, num_rows)[:sent]]
    arrived = np.concatenate([arrived, np.zeros((1, 3), np.float32)])
    expanded = arrived[np.where((source >= 0) & (source < sent), source, sent)]
    np.testing.assert_array_equal(moved, expanded)
    kept = np.where(slot_mask & (slot_row < sent), slot_row, num_rows)
    np.testing.assert_allclose(summed, padded[kept].sum(axis=1), rtol=1e-6)
