"""Grouped expert FFN against float64 numpy, for every grouped-matmul backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh

import jep
from jep import experts

# The backends that take any float dtype and shape; "pallas" (Hopper, bf16, 128-wide tiles) has
# its own tests below and in test_grouped_matmul_kernel.py.
BACKENDS = ("xla", "reference")
ON_HOPPER = experts._pallas_takes(jnp.zeros((1, 128), jnp.bfloat16),
                                  jnp.zeros((1, 128, 128), jnp.bfloat16))


def numpy_ffn(x, group_sizes, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    start = 0
    for g, size in enumerate(group_sizes):
        rows = x[start:start + size]
        gate = rows @ w_gate[g]
        out[start:start + size] = (gate / (1 + np.exp(-gate)) * (rows @ w_up[g])) @ w_down[g]
        start += size
    return out


def group_sizes_for(kind, rng, num_groups, num_rows):
    if kind == "random":
        cuts = np.sort(rng.integers(0, num_rows + 1, size=num_groups))
        return np.diff(np.concatenate([[0], cuts])).astype(np.int32)
    if kind == "one_group":  # everything in one expert, the others empty
        sizes = np.zeros(num_groups, np.int32)
        sizes[num_groups // 2] = num_rows - 3
        return sizes
    return np.zeros(num_groups, np.int32)  # "empty"


def make_inputs(rng, num_rows=37, hidden=8, ffn=12, num_groups=5):
    x = rng.normal(size=(num_rows, hidden)).astype(np.float32)
    w_gate = rng.normal(size=(num_groups, hidden, ffn)).astype(np.float32) / 3
    w_up = rng.normal(size=(num_groups, hidden, ffn)).astype(np.float32) / 3
    w_down = rng.normal(size=(num_groups, ffn, hidden)).astype(np.float32) / 3
    return x, w_gate, w_up, w_down


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "one_group", "empty"])
def test_expert_ffn_matches_float64_and_zeroes_rows_past_the_groups(rng, backend, kind):
    x, w_gate, w_up, w_down = make_inputs(rng)
    sizes = group_sizes_for(kind, rng, 5, x.shape[0])
    out = jep.expert_ffn(x, jnp.asarray(sizes), w_gate, w_up, w_down, backend=backend)
    want = numpy_ffn(x, sizes, w_gate, w_up, w_down)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[sizes.sum():] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_gradients_match_float64(rng, backend):
    x, w_gate, w_up, w_down = make_inputs(rng)
    sizes = jnp.asarray(group_sizes_for("random", rng, 5, x.shape[0]))
    cotangent = rng.normal(size=x.shape)

    def loss(fn, *args):
        return jnp.sum(fn(*args) * cotangent)

    got = jax.grad(lambda *a: loss(lambda *b: jep.expert_ffn(b[0], sizes, *b[1:], backend=backend), *a),
                   argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)
    with jax.enable_x64(True):
        def ffn64(x, w_gate, w_up, w_down):
            return jep.expert_ffn(x, sizes, w_gate, w_up, w_down, backend="reference")
        want = jax.grad(lambda *a: loss(ffn64, *a), argnums=(0, 1, 2, 3))(
            *(np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_expert_ffn_bf16_within_1e2(rng):
    x, w_gate, w_up, w_down = make_inputs(rng)
    sizes = group_sizes_for("random", rng, 5, x.shape[0])
    to_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    out = jep.expert_ffn(to_bf16(x), jnp.asarray(sizes), to_bf16(w_gate), to_bf16(w_up), to_bf16(w_down))
    want = numpy_ffn(x, sizes, w_gate, w_up, w_down)
    assert out.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert err < 1e-2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(recv_x=np.zeros((4, 8, 1), np.float32)), ValueError, "recv_x must have rank 2"),
    (dict(group_sizes=np.zeros(5, np.float32)), TypeError, "group_sizes must be an integer"),
    (dict(w_up=np.zeros((5, 8, 13), np.float32)), ValueError, "w_up must have shape"),
    (dict(w_down=np.zeros((5, 8, 12), np.float32)), ValueError, "w_down must have shape"),
    (dict(w_gate=np.zeros((4, 8, 12), np.float32)), ValueError, "w_gate must have shape"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(backend="magic"), ValueError, "backend"),
])
def test_expert_ffn_bad_input_raises(rng, kwargs, error, match):
    x, w_gate, w_up, w_down = make_inputs(rng)
    args = dict(recv_x=x, group_sizes=np.zeros(5, np.int32), w_gate=w_gate, w_up=w_up,
                w_down=w_down) | kwargs
    with pytest.raises(error, match=match):
        jep.expert_ffn(args.pop("recv_x"), args.pop("group_sizes"), args.pop("w_gate"),
                       args.pop("w_up"), args.pop("w_down"), **args)


def test_pallas_backend_where_it_cannot_run_raises_naming_the_alternatives(rng):
    x, w_gate, w_up, w_down = make_inputs(rng)
    with pytest.raises(ValueError, match="Hopper GPU.*Use 'xla' or 'auto'"):
        jep.expert_ffn(x, np.zeros(5, np.int32), w_gate, w_up, w_down, backend="pallas")


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.skipif(not ON_HOPPER, reason="the Pallas Mosaic GPU kernels need a Hopper GPU")
def test_pallas_expert_ffn_and_gradients_match_float64():
    rng = np.random.default_rng(0)
    x, w_gate, w_up, w_down = make_inputs(rng, num_rows=300, hidden=256, ffn=128, num_groups=4)
    x, w_gate, w_up, w_down = (np.asarray(jnp.asarray(a / 4, jnp.bfloat16), np.float32)
                               for a in (x, w_gate, w_up, w_down))
    sizes = np.array([90, 0, 150, 40], np.int32)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (x, w_gate, w_up, w_down)]
    cotangent = rng.normal(size=x.shape)

    def loss(backend):
        return lambda *a: jnp.sum(jep.expert_ffn(a[0], jnp.asarray(sizes), *a[1:], backend=backend)
                                  .astype(jnp.float32) * cotangent)

    out = jep.expert_ffn(*bf16[:1], jnp.asarray(sizes), *bf16[1:], backend="pallas")
    assert relative_error(out, numpy_ffn(x, sizes, w_gate, w_up, w_down)) < 1e-2
    grads = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3))(*bf16)
    with jax.enable_x64(True):
        want = jax.grad(loss("reference"), argnums=(0, 1, 2, 3))(
            *(np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down)))
    for got, expected in zip(grads, want):
        assert relative_error(got, expected) < 1e-2


@pytest.mark.skipif(not ON_HOPPER, reason="the Pallas Mosaic GPU kernels need a Hopper GPU")
def test_moe_with_the_pallas_experts_matches_the_reference():
    rng = np.random.default_rng(1)
    config = jep.MoEConfig(num_experts=8, top_k=2, expert_backend="pallas")
    params = jep.init_params(jax.random.key(0), hidden=256, ffn=128, config=config)
    params = {k: (v * 50 if k == "router" else jnp.asarray(v, jnp.bfloat16))
              for k, v in params.items()}
    x = jnp.asarray(rng.normal(size=(512, 256)), jnp.bfloat16)
    mesh = make_mesh((1,), ("ep",))
    loss = lambda x, p, moe: jnp.sum(moe(x, p)[0].astype(jnp.float32) ** 2)  # noqa: E731
    got = jax.jit(jax.value_and_grad(
        lambda x, p: loss(x, p, lambda x, p: jep.moe(x, p, config=config, mesh=mesh)),
        argnums=(0, 1)))(x, params)
    with jax.enable_x64(True):
        as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        want = jax.value_and_grad(
            lambda x, p: loss(x, p, lambda x, p: jep.reference.moe(x, p, config=config,
                                                                   ep_size=1, dp_size=1)),
            argnums=(0, 1))(as64(x), jax.tree.map(as64, params))
    assert relative_error(got[0], want[0]) < 1e-2
    assert relative_error(got[1][0], want[1][0]) < 2e-2
    for name in ("w_gate", "w_up", "w_down"):
        assert relative_error(got[1][1][name], want[1][1][name]) < 2e-2, name


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True], ids=["gate-up-apart", "gated-kernel"])
def test_chunks_equal_expert_ffn_of_each_chunk_forward_and_backward(rng, monkeypatch, gated):
    """expert_ffn_chunks on the Pallas kernels (in interpret mode off a GPU: one weight gradient
    over every chunk's rows, the gate and up products' dx summed in one kernel), and expert_ffn
    of each chunk on them, against expert_ffn of each chunk on the reference backend. `gated`:
    with a "gated" entry in the tuning table, the gate and up products and the activation in
    one kernel a chunk (`grouped_matmul_gated`)."""
    import functools

    import jep_kernels.grouped_matmul as gm

    if not ON_HOPPER:
        monkeypatch.setattr(experts, "grouped_matmul_backend",
                            lambda x, w, backend: "pallas" if backend == "auto" else backend)
        for name in ("grouped_matmul", "grouped_matmul_chunks", "grouped_matmul_weights"):
            monkeypatch.setattr(gm, name, functools.partial(getattr(gm, name), interpret=True))
    entry_for, gated_calls = gm.tuning.entry_for, []
    monkeypatch.setattr(gm.tuning, "entry_for", lambda op, k, n, groups: (
        (gm.tuning.default(op, k, n) if gated else None) if op == gm.tuning.GATED
        else entry_for(op, k, n, groups)))
    gated_kernel = gm.grouped_matmul_gated

    def counted(*args, **kwargs):
        gated_calls.append(1)
        return gated_kernel(*args, **kwargs, interpret=not ON_HOPPER)

    monkeypatch.setattr(gm, "grouped_matmul_gated", counted)
    hidden, ffn = 128, 128
    sizes = [jnp.asarray(s, jnp.int32) for s in ([30, 0], [5, 19])]  # rows past the groups
    xs = tuple(jnp.asarray(rng.normal(size=(r, hidden)), jnp.bfloat16) for r in (32, 24))
    w_gate, w_up = (jnp.asarray(rng.normal(size=(2, hidden, ffn)) / 11, jnp.bfloat16)
                    for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(2, ffn, hidden)) / 11, jnp.bfloat16)

    def loss(call, xs, *weights):
        if call == "chunks":
            outs = experts.expert_ffn_chunks(xs, sizes, *weights)
        else:  # expert_ffn a chunk: on the Pallas kernels ("auto"), or the reference
            outs = [experts.expert_ffn(x, s, *weights, backend=call)
                    for x, s in zip(xs, sizes)]
        return sum(jnp.sum(o.astype(jnp.float32) * (i + 1)) for i, o in enumerate(outs)), outs

    grad = jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    want, want_outs = grad("reference", xs, w_gate, w_up, w_down)
    for call in ("chunks", "auto"):
        got, outs = grad(call, xs, w_gate, w_up, w_down)
        # bf16 throughout; the per-chunk weight gradients are each rounded, then summed in bf16:
        # within 1e-2 of each array's largest value.
        for a, b in zip(jax.tree.leaves((got, outs)), jax.tree.leaves((want, want_outs))):
            assert a.shape == b.shape and a.dtype == b.dtype
            b = np.asarray(b, np.float32)
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0,
                                       atol=1e-2 * max(np.abs(b).max(), 1e-3))
        assert not np.asarray(outs[0][30:]).any()
    assert bool(gated_calls) == gated  # the gated kernel ran where the table has its entry
    with pytest.raises(ValueError, match="as many chunks"):
        experts.expert_ffn_chunks(xs, sizes[:1], w_gate, w_up, w_down)


def _quantized64(a, rows: bool):
    """float64 of a's FP8 quantization: per 1 x 128 tile of rows, or per 128 x 128 block."""
    q = jep.fp8.quantize_rows(a) if rows else jep.fp8.quantize_blocks(a)
    deq = jep.fp8.dequantize_rows if rows else jep.fp8.dequantize_blocks
    return np.asarray(deq(*q, jnp.float32), np.float64)


def grouped64(x, w, sizes):
    """float64 numpy grouped product: rows of group g times w[g]; rows past the groups 0."""
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


@pytest.mark.parametrize("kind", ["random", "one_group", "empty"])
def test_fp8_grouped_matmul_matches_float64_of_the_same_quantization(rng, kind):
    """Forward: x per 1 x 128 tile, w per 128 x 128 block (N = 384 with K = 256: whole blocks;
    the group sizes leave a zero tail). dx: dy per tile times the same quantized w transposed.
    dw: x^T dy per group, both quantized along the group's rows (`quantize_columns`), to the
    master weights. The emulated products (backend "xla", what "auto" runs off Hopper): on
    Hopper float32 rows take the kernels, whose tensor cores sum each 128-deep block more
    narrowly than float32 (`test_fp8_kernel_path_equals_the_emulated_one`)."""
    num_rows, k, n, groups = 40, 256, 384, 5
    x = jnp.asarray(rng.normal(size=(num_rows, k)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=(groups, k, n)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(num_rows, n)), jnp.float32)
    sizes = group_sizes_for(kind, rng, groups, num_rows)

    y, pullback = jax.vjp(lambda x, w: experts.fp8_grouped_matmul(x, w, jnp.asarray(sizes),
                                                                  backend="xla"), x, w)
    dx, dw = pullback(dy)
    w64 = _quantized64(w, rows=False)
    np.testing.assert_allclose(y, grouped64(_quantized64(x, rows=True), w64, sizes),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        dx, grouped64(_quantized64(dy, rows=True), np.swapaxes(w64, 1, 2), sizes),
        rtol=1e-5, atol=1e-5)
    group_sizes = jnp.asarray(sizes)
    x64, dy64 = (np.asarray(jep.fp8.dequantize_columns(
        *jep.fp8.quantize_columns(a, group_sizes), group_sizes, num_rows, jnp.float32),
        np.float64) for a in (x, dy))
    want_dw = np.zeros(w.shape)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        want_dw[g] = x64[rows].T @ dy64[rows]
        start += size
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5 * np.abs(want_dw).max())
    # The quantization is real: the product differs from the unquantized one.
    assert np.abs(np.asarray(y) - grouped64(np.asarray(x), np.asarray(w), sizes)).max() > 1e-3 \
        or kind == "empty"


@pytest.mark.skipif(not jep.platform.on_hopper(), reason="the FP8 kernel runs on Hopper GPUs")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_kernel_path_equals_the_emulated_one(rng, dtype):
    """On Hopper, bf16 and float32 rows take the FP8 kernels for the forward, dx and dw; the
    emulated products (backend "xla") are the same numerics: equal but for bf16 rounding and
    the tensor cores' narrower sums inside each 128-deep block (DeepSeek-V3's report: about 14
    bits kept; measured 0.3-0.6% of the largest entry in bf16, 0.03% in float32 at K = 256).
    1024 rows: the one-pass quantize kernel takes them (a multiple of 64)."""
    x = jnp.asarray(rng.normal(size=(1024, 512)), dtype)
    w = jnp.asarray(rng.normal(size=(4, 512, 256)) / 20, dtype)
    dy = jnp.asarray(rng.normal(size=(1024, 256)), dtype)
    sizes = jnp.asarray([300, 0, 500, 150], jnp.int32)
    results = {}
    for backend in ("auto", "xla"):
        y, pullback = jax.vjp(lambda x, w, b=backend: experts.fp8_grouped_matmul(
            x, w, sizes, backend=b), x, w)
        results[backend] = (y, *pullback(dy))
    for got, want in zip(results["auto"], results["xla"]):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        np.testing.assert_allclose(got, want, atol=(1e-2 if dtype == jnp.bfloat16 else 2e-3)
                                   * np.abs(want).max())
    assert not np.asarray(results["auto"][0][950:], np.float32).any()  # the zero tail


@pytest.mark.slow
@pytest.mark.parametrize("dtype, gated", [(jnp.bfloat16, False), (jnp.float32, False),
                                          (jnp.float32, True)])
def test_fp8_experts_on_the_kernels_equal_the_emulated_ones(rng, monkeypatch, dtype, gated):
    """The FP8 experts on the Pallas kernels (interpreted off a GPU): the products, their
    operands' quantization, the gate and up products' dx as one summed FP8 product, and the
    three FP8 weight gradients, against the emulated FP8 experts (backend "xla"), value and
    gradients, within bf16 rounding and the sums' order: 1e-2 of each array's largest in
    norm, each entry within 3e-2 of it (a product's sums moving a later operand's e4m3 value
    by a step, or a tile's max-abs and with it the tile's scale, moves a few entries by a few
    percent: on an H200 2 of 8192 by 1.2e-2 of the largest). float32
    rows and weights take the FP8 kernels too (their quantization along the rows and the
    weights' by XLA). `gated`: with "fp8_gated" and "dw_fp8_pair" entries in the tuning table,
    the gate and up products and the activation are one kernel, and so are their weight
    gradients. It rounds h once, from the float32 products,
    where the products apart round gate and up to the rows' dtype first: in bf16 that moves h
    by its rounding, which moves some of h's e4m3 values by a step (2% of y measured), so it
    is compared in float32."""
    import functools

    import jep_kernels.grouped_matmul as gm
    import jep_kernels.quantize as quantize

    if not ON_HOPPER:
        monkeypatch.setattr(experts, "_runs_fp8_kernel",
                            lambda rows, w_shape, backend: backend == "auto")
        for module, names in ((gm, ("grouped_matmul_fp8", "grouped_matmul_dw_fp8")),
                              (quantize, ("quantize_rows", "quantize_columns",
                                          "quantize_weight"))):
            for name in names:
                monkeypatch.setattr(module, name,
                                    functools.partial(getattr(module, name), interpret=True))
    products = []  # the products of each FP8 kernel call ("gated": the gated kernel's)
    fp8_kernel, gated_kernel = gm.grouped_matmul_fp8, gm.grouped_matmul_fp8_gated
    monkeypatch.setattr(gm, "grouped_matmul_fp8", lambda x, *args, **kwargs: products.append(
        len(x) if isinstance(x, (list, tuple)) else 1) or fp8_kernel(x, *args, **kwargs))
    monkeypatch.setattr(gm, "grouped_matmul_fp8_gated", lambda *args, **kwargs: products.append(
        "gated") or gated_kernel(*args, **kwargs, interpret=not ON_HOPPER))
    weight_gradients = []  # the weight gradients of each FP8 dw kernel call
    dw_kernel = gm.grouped_matmul_dw_fp8
    monkeypatch.setattr(gm, "grouped_matmul_dw_fp8", lambda x_t, x_s, dy_t, *args, **kwargs: (
        weight_gradients.append(len(dy_t) if isinstance(dy_t, list) else 1)
        or dw_kernel(x_t, x_s, dy_t, *args, **kwargs)))
    entry_for = gm.tuning.entry_for
    monkeypatch.setattr(gm.tuning, "entry_for", lambda op, k, n, groups: (
        (gm.tuning.default(op, k, n) if gated else None)
        if op in (gm.tuning.FP8_GATED, gm.tuning.DW_FP8_PAIR) else entry_for(op, k, n, groups)))
    hidden, ffn, groups = 128, 256, 2
    x = jnp.asarray(rng.normal(size=(64, hidden)), dtype)
    sizes = jnp.asarray([40, 17], jnp.int32)  # and a tail of rows past the groups
    w_gate, w_up = (jnp.asarray(rng.normal(size=(groups, hidden, ffn)) / 11, dtype)
                    for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(groups, ffn, hidden)) / 16, dtype)

    def loss(backend, *args):
        y = experts.expert_ffn(args[0], sizes, *args[1:], backend=backend, precision="fp8")
        return jnp.sum(y.astype(jnp.float32) * jnp.arange(hidden, dtype=jnp.float32)), y

    results = {backend: jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)(
        backend, x, w_gate, w_up, w_down) for backend in ("auto", "xla")}
    # gate, up (or both and the activation), down, down's dx, gate's and up's dx
    assert products == ["gated" if gated else 1] * (1 if gated else 2) + [1, 1, 2]
    assert weight_gradients == [1] + ([2] if gated else [1, 1])  # down's, then gate's and up's
    for got, want in zip(*(jax.tree.leaves(results[b]) for b in ("auto", "xla"))):
        assert got.shape == want.shape and got.dtype == want.dtype
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())
    assert not np.asarray(results["auto"][1][57:], np.float32).any()


def test_fp8_backend_takes_float32_rows_on_hopper_and_refuses_what_cannot_run(monkeypatch):
    """The FP8 kernels' inputs are e4m3 whatever the rows' dtype: on Hopper they take bf16, f16
    and float32 rows (the bf16 kernels bf16/f16 only), K and N multiples of 128; elsewhere
    "auto" is the emulation, and "pallas" or an unknown backend is refused by name."""
    rows32, shape = jax.ShapeDtypeStruct((8, 256), jnp.float32), (2, 256, 384)
    if not jep.platform.on_hopper():
        assert experts.fp8_backend(rows32, shape) == "xla"
        with pytest.raises(ValueError, match="backend='pallas' .the FP8 kernels.* needs a Hopper"):
            experts.fp8_grouped_matmul(jnp.zeros((8, 256)), jnp.zeros(shape),
                                       jnp.zeros(2, jnp.int32), backend="pallas")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        experts.fp8_backend(rows32, shape, "mosaic")
    monkeypatch.setattr(experts, "on_hopper", lambda: True)
    assert experts.fp8_backend(rows32, shape) == "pallas"
    assert experts.grouped_matmul_backend(rows32, jax.ShapeDtypeStruct(shape, jnp.float32)) == "xla"
    assert experts.fp8_backend(rows32, (2, 256, 320)) == "xla"  # N not a multiple of 128
    assert experts.fp8_backend(jax.ShapeDtypeStruct((8, 256), jnp.float64), shape) == "xla"


def test_fp8_rows_quantized_once_for_gate_and_up(rng, monkeypatch):
    """Given the rows' quantization (by rows and along them), an FP8 product is the same, value
    and gradients, as one that makes it; the FP8 experts quantize each chunk's rows once for
    the gate and up products (the forward: rows, hidden; along the rows: the chunk's rows, for
    both weight gradients), and a wrong quantization is refused by name."""
    x = jnp.asarray(rng.normal(size=(24, 128)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 128, 256)) * 0.1, jnp.float32)
    sizes = jnp.asarray([10, 0, 11], jnp.int32)
    dy = jnp.asarray(rng.normal(size=(24, 256)), jnp.float32)

    def run(**given):
        y, pullback = jax.vjp(lambda x, w: experts.fp8_grouped_matmul(x, w, sizes, **given), x, w)
        return (y, *pullback(dy))

    for got, want in zip(run(quantized_rows=jep.fp8.quantize_rows(x),
                             quantized_columns=jep.fp8.quantize_columns(x, sizes)), run()):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match=r"quantized_rows must be \(q float8_e4m3fn\[24, 128\]"):
        experts.fp8_grouped_matmul(x, w, sizes, quantized_rows=jep.fp8.quantize_rows(x[:8]))
    with pytest.raises(ValueError, match=r"quantized_columns must be \(q float8_e4m3fn\[128, 512\]"):
        experts.fp8_grouped_matmul(x, w, sizes, quantized_columns=jep.fp8.quantize_rows(x))

    calls, columns = [], []
    quantize_rows, quantize_columns = jep.fp8.quantize_rows, jep.fp8.quantize_columns
    monkeypatch.setattr(jep.fp8, "quantize_rows",
                        lambda a, **kw: calls.append(a.shape) or quantize_rows(a, **kw))
    monkeypatch.setattr(jep.fp8, "quantize_columns",
                        lambda a, s: columns.append(a.shape) or quantize_columns(a, s))
    w_down = jnp.asarray(rng.normal(size=(3, 256, 128)) * 0.1, jnp.float32)
    jax.eval_shape(lambda x: jep.expert_ffn(x, sizes, w, w, w_down, precision="fp8"), x)
    assert calls == [(24, 128), (24, 256)] and columns == [(24, 128)]
    calls.clear()
    columns.clear()
    jax.eval_shape(lambda x: experts.expert_ffn_chunks(
        (x, x[:8]), (sizes, jnp.asarray([8, 0, 0], jnp.int32)), w, w, w_down,
        precision="fp8"), x)
    assert calls == [(24, 128), (8, 128), (24, 256), (8, 256)]
    assert columns == [(24, 128), (8, 128)]
    # The backward: each product's dy along its rows, and the hidden rows for w_down's.
    columns.clear()
    jax.eval_shape(jax.grad(lambda x: jep.expert_ffn(x, sizes, w, w, w_down,
                                                     precision="fp8").sum()), x)
    assert sorted(columns) == sorted([(24, 128), (24, 128), (24, 256), (24, 256), (24, 256)])


def test_fp8_experts_on_the_kernels_lower_for_hopper_without_loops(monkeypatch):
    """The FP8 experts' forward and backward on the kernels lower for Hopper from any platform,
    all three products and their quantization as Mosaic GPU kernels, with no while loop in the
    program: a GPU runs a loop's kernels outside the step's CUDA graph, each launched on its own
    (a binary search over the groups did: 24 kernels a step, 0.24 ms idle, on an H200)."""
    monkeypatch.setattr(experts, "_runs_fp8_kernel",
                        lambda rows, w_shape, backend: backend == "auto")
    rows, hidden, ffn, groups = 512, 256, 384, 4
    spec = jax.ShapeDtypeStruct

    def loss(x, sizes, w_gate, w_up, w_down):
        y = jep.expert_ffn(x, sizes, w_gate, w_up, w_down, precision="fp8")
        return y.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).trace(
        spec((rows, hidden), jnp.bfloat16), spec((groups,), jnp.int32),
        *(spec((groups, hidden, ffn), jnp.bfloat16) for _ in range(2)),
        spec((groups, ffn, hidden), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.while" not in text
    for kernel in ("jep_grouped_fp8", "jep_grouped_dw_fp8", "jep_fp8_quantize_weight",
                   "jep_fp8_quantize_columns", "jep_fp8_quantize_mosaic_gpu"):
        assert kernel in text


def test_fp8_expert_ffn_is_the_swiglu_of_fp8_products_and_needs_128_channel_tiles(rng):
    num_rows, hidden, ffn, groups = 24, 128, 256, 3
    x = jnp.asarray(rng.normal(size=(num_rows, hidden)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(groups, hidden, ffn)) * 0.1, jnp.float32)
                    for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(groups, ffn, hidden)) * 0.1, jnp.float32)
    sizes = np.array([10, 0, 11], np.int32)
    # The emulated products (on Hopper float32 rows take the kernels: compared above).
    got = jep.expert_ffn(x, jnp.asarray(sizes), w_gate, w_up, w_down, precision="fp8",
                         backend="xla")
    x64 = _quantized64(x, rows=True)
    gate = grouped64(x64, _quantized64(w_gate, rows=False), sizes)
    up = grouped64(x64, _quantized64(w_up, rows=False), sizes)
    hidden_act = jnp.asarray((gate / (1 + np.exp(-gate)) * up), jnp.float32)
    want = grouped64(_quantized64(hidden_act, rows=True), _quantized64(w_down, rows=False), sizes)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 128"):
        jep.expert_ffn(x[:, :64], jnp.asarray(sizes), w_gate[:, :64], w_up[:, :64],
                       w_down[:, :, :64], precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        jep.expert_ffn(x, jnp.asarray(sizes), w_gate, w_up, w_down, precision="fp16")
