"""HF-layout checkpoints (`jep.interop.hf`): tiny checkpoints written here with HF's tensor names
and config keys, loaded onto a mesh, run against the HF block computed from the HF tensors
themselves (numpy, float64), and written back."""

import filecmp
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import jep
from jep import fp8
from conftest import make_mesh
from jep.interop import hf

H, F, F_SHARED, E, K = 16, 8, 12, 8, 2

CONFIGS = {
    "mixtral": dict(model_type="mixtral", num_local_experts=E, intermediate_size=F),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=E, moe_intermediate_size=F,
                      shared_expert_intermediate_size=F_SHARED, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=E, moe_intermediate_size=F,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek_v3": dict(model_type="deepseek_v3", n_routed_experts=E, moe_intermediate_size=F,
                        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, scoring_func="sigmoid",
                        first_k_dense_replace=1, moe_layer_freq=1, num_nextn_predict_layers=0),
}
# Per-expert projection names (gate, up, down) of each architecture.
PROJECTIONS = {"mixtral": ("w1", "w3", "w2")}


def moe_layers(arch, num_layers=3):
    return {"qwen2_moe": [0, 2], "deepseek_v3": [1, 2]}.get(arch, list(range(num_layers)))


def write_checkpoint(path, arch, *, fused=False, dtype=np.float32, seed=0, num_layers=3,
                     shards=2, experts=E, top_k=K):
    """A checkpoint directory with HF's names: the MoE blocks, plus attention, norms and a dense
    MLP where the architecture has one, over `shards` safetensors files with an index."""
    rng = np.random.default_rng(seed)
    config = {"hidden_size": H, "num_hidden_layers": num_layers, "num_experts_per_tok": top_k,
              "hidden_act": "silu", "vocab_size": 32, **CONFIGS[arch]}
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in config:
            config[key] = experts

    def w(*shape, scale=0.3):
        return (scale * rng.normal(size=shape)).astype(dtype)

    tensors = {"model.embed_tokens.weight": w(32, H), "model.norm.weight": w(H)}
    block = "block_sparse_moe" if arch == "mixtral" and not fused else "mlp"
    gate, up, down = PROJECTIONS.get(arch, ("gate_proj", "up_proj", "down_proj"))
    for i in range(num_layers):
        layer = f"model.layers.{i}."
        tensors |= {layer + "self_attn.q_proj.weight": w(H, H), layer + "input_layernorm.weight": w(H)}
        if i not in moe_layers(arch, num_layers):
            tensors |= {f"{layer}mlp.{p}.weight": w(*s) for p, s in
                        (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F)))}
            continue
        p = f"{layer}{block}."
        tensors[p + "gate.weight"] = w(experts, H)
        if fused:
            tensors |= {p + "experts.gate_up_proj": w(experts, 2 * F, H),
                        p + "experts.down_proj": w(experts, H, F)}
        else:
            for j in range(experts):
                tensors |= {f"{p}experts.{j}.{gate}.weight": w(F, H),
                            f"{p}experts.{j}.{up}.weight": w(F, H),
                            f"{p}experts.{j}.{down}.weight": w(H, F)}
        if arch == "deepseek_v3":
            tensors[p + "gate.e_score_correction_bias"] = (0.1 * rng.normal(size=experts)).astype(np.float32)
            tensors |= {f"{p}shared_experts.{n}.weight": w(*s) for n, s in
                        (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F)))}
        if arch == "qwen2_moe":
            tensors |= {f"{p}shared_expert.{n}.weight": w(*s) for n, s in
                        (("gate_proj", (F_SHARED, H)), ("up_proj", (F_SHARED, H)),
                         ("down_proj", (H, F_SHARED)))}
            tensors[p + "shared_expert_gate.weight"] = w(1, H)
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return tensors


def hf_block(x, tensors, arch, i, fused=False):
    """The HF MoE block of layer i, token by token in float64, from the HF tensors."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    block = "block_sparse_moe" if arch == "mixtral" and not fused else "mlp"
    p = f"model.layers.{i}.{block}."
    gate, up, down = PROJECTIONS.get(arch, ("gate_proj", "up_proj", "down_proj"))
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    mlp = lambda v, g, u, d: d @ (silu(g @ v) * (u @ v))  # noqa: E731
    out = np.zeros_like(x)
    for n, v in enumerate(x):
        logits = t[p + "gate.weight"] @ v
        if arch == "deepseek_v3":
            scores = 1 / (1 + np.exp(-logits))
            biased = scores + t[p + "gate.e_score_correction_bias"]
            groups = biased.reshape(4, -1)
            group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
            keep = np.argsort(-group_score)[:2]
            masked = np.full_like(biased, -np.inf).reshape(4, -1)
            masked[keep] = groups[keep]
            ids = np.argsort(-masked.reshape(-1))[:K]
            weights = scores[ids] / scores[ids].sum() * 2.5
        else:
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            ids = np.argsort(-probs)[:K]
            weights = probs[ids]
            if arch != "qwen2_moe":  # Mixtral always renormalizes; Qwen3 here by norm_topk_prob
                weights = weights / weights.sum()
        for e, wt in zip(ids, weights):
            if fused:
                gu, dn = t[p + "experts.gate_up_proj"][e], t[p + "experts.down_proj"][e]
                out[n] += wt * mlp(v, gu[:F], gu[F:], dn)
            else:
                out[n] += wt * mlp(v, *(t[f"{p}experts.{e}.{q}.weight"] for q in (gate, up, down)))
        if arch == "deepseek_v3":
            out[n] += mlp(v, *(t[f"{p}shared_experts.{q}.weight"] for q in
                               ("gate_proj", "up_proj", "down_proj")))
        if arch == "qwen2_moe":
            s = f"{p}shared_expert."
            shared = mlp(v, t[s + "gate_proj.weight"], t[s + "up_proj.weight"], t[s + "down_proj.weight"])
            out[n] += shared / (1 + np.exp(-(t[p + "shared_expert_gate.weight"] @ v)[0]))
    return out


SLOW = pytest.mark.slow
CASES = [("mixtral", False), pytest.param("mixtral", True, marks=SLOW), ("qwen2_moe", False),
         ("qwen3_moe", False), pytest.param("qwen3_moe", True, marks=SLOW), ("deepseek_v3", False),
         ("deepseek_v3", True)]


@pytest.mark.parametrize("arch, fused", CASES)
def test_loaded_layers_equal_the_hf_block_and_save_back_bit_for_bit(tmp_path, arch, fused, rng):
    source, copy = str(tmp_path / "hf"), str(tmp_path / "copy")
    tensors = write_checkpoint(source, arch, fused=fused, seed=int(rng.integers(1 << 30)))
    mesh = make_mesh((2, 4), ("dp", "ep"))
    info, layers = hf.load(source, mesh=mesh)
    assert info.architecture == arch and info.moe_layers == tuple(moe_layers(arch))
    x = rng.normal(size=(4, 8, H))
    for i in info.moe_layers:
        assert layers[i]["w_gate"].sharding.spec[0] == "ep"
        y, _ = jax.jit(lambda x, p: jep.moe(x, p, config=info.config, mesh=mesh))(
            jnp.asarray(x, jnp.float32), layers[i])
        want = hf_block(x.reshape(-1, H), tensors, arch, i, fused).reshape(x.shape)
        np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)
    hf.save(copy, layers, source=source)
    assert sorted(os.listdir(copy)) == sorted(os.listdir(source))
    for file in os.listdir(source):
        assert filecmp.cmp(os.path.join(source, file), os.path.join(copy, file), shallow=False), file


@pytest.mark.parametrize("fused", [False, True])
def test_changed_params_are_what_is_saved_and_bf16_stays_bf16(tmp_path, fused):
    source, copy = str(tmp_path / "hf"), str(tmp_path / "copy")
    write_checkpoint(source, "qwen3_moe", fused=fused, dtype=ml_dtypes.bfloat16)
    info, layers = hf.load(source)
    assert layers[0]["w_up"].dtype == jnp.bfloat16 and layers[0]["router"].dtype == jnp.float32
    changed = {i: dict(p) for i, p in layers.items()}
    changed[1]["w_up"] = (changed[1]["w_up"] * 2).at[3, 5, 1].set(7.0)
    changed[2]["router"] = changed[2]["router"].at[0, 0].set(0.5)
    hf.save(copy, changed, source=source)
    _, again = hf.load(copy)
    for i in info.moe_layers:
        for name, value in changed[i].items():
            assert again[i][name].dtype == value.dtype
            np.testing.assert_array_equal(np.asarray(again[i][name], np.float32),
                                          np.asarray(value, np.float32), err_msg=f"{i} {name}")


def test_deepseek_fp8_weights_load_dequantized_and_save_back_in_fp8(tmp_path):
    """DeepSeek-V3's release: e4m3 expert weights (shared ones too) with a weight_scale_inv of
    float32 scales per 128 x 128 block (here one partial block a weight)."""
    source, copy = str(tmp_path / "fp8"), str(tmp_path / "copy")
    write_checkpoint(source, "deepseek_v3", seed=3)
    stored = {}

    def to_fp8(tensors):
        for name in list(tensors):
            if ".experts." in name or ".shared_experts." in name:
                q, scales = fp8.quantize_blocks(jnp.asarray(tensors[name]))
                tensors[name] = np.asarray(q)
                tensors[f"{name}_scale_inv"] = np.asarray(scales)
                stored[name] = (tensors[name], tensors[f"{name}_scale_inv"])

    _edit(source, to_fp8)
    info, layers = hf.load(source, mesh=make_mesh((2, 4), ("dp", "ep")))
    for i in info.moe_layers:
        p = f"model.layers.{i}.mlp."
        assert layers[i]["w_gate"].dtype == jnp.bfloat16
        assert layers[i]["router"].dtype == jnp.float32  # the router is not quantized
        for j in (0, E - 1):
            q, scales = stored[f"{p}experts.{j}.down_proj.weight"]
            want = np.asarray(fp8.dequantize_blocks(q, scales, jnp.bfloat16)).T
            np.testing.assert_array_equal(np.asarray(layers[i]["w_down"])[j], want)
        q, scales = stored[f"{p}shared_experts.up_proj.weight"]
        np.testing.assert_array_equal(np.asarray(layers[i]["shared_up"]),
                                      np.asarray(fp8.dequantize_blocks(q, scales)).T)
    hf.save(copy, layers, source=source)
    saved = hf._Tensors(copy)
    assert sorted(saved.file_of) == sorted(hf._Tensors(source).file_of)
    _, again = hf.load(copy)
    for i in info.moe_layers:
        name = f"model.layers.{i}.mlp.experts.2.gate_proj.weight"
        assert saved.dtype(name) == np.dtype(ml_dtypes.float8_e4m3fn)
        assert saved.dtype(f"{name}_scale_inv") == np.float32
        assert saved.shape(f"{name}_scale_inv") == (1, 1)
        for param, value in layers[i].items():
            got, want = (np.asarray(a, np.float64) for a in (again[i][param], value))
            if param in ("router", "bias"):
                np.testing.assert_array_equal(got, want)
            else:  # quantized afresh: within e4m3's rounding
                assert np.all(np.abs(got - want) <= np.abs(want) / 16 + 1e-3 * np.abs(want).max())
    # A weight without its scales is named.
    lost = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"
    _edit(copy, lambda tensors: tensors.pop(lost))
    with pytest.raises(ValueError, match="lacks tensor '" + lost.replace(".", r"\.")):
        hf.load(copy)


def test_each_device_reads_only_its_experts_rows(tmp_path, monkeypatch):
    source = str(tmp_path / "hf")
    write_checkpoint(source, "qwen3_moe", fused=True)
    reads = []
    original = hf._Tensors.read
    monkeypatch.setattr(hf._Tensors, "read",
                        lambda self, name, rows=slice(None): reads.append((name, rows))
                        or original(self, name, rows))
    hf.load(source, mesh=make_mesh((2, 4), ("dp", "ep")), layers=[0])
    expert_reads = [rows for name, rows in reads if ".experts." in name]
    assert expert_reads and all(len(range(E)[rows]) == E // 4 for rows in expert_reads)


def test_config_maps_each_architectures_routing(tmp_path):
    write_checkpoint(str(tmp_path / "ds"), "deepseek_v3")
    config = hf.read_config(str(tmp_path / "ds")).config
    assert (config.score, config.num_groups, config.topk_groups, config.renormalize,
            config.routed_scaling_factor) == ("sigmoid", 4, 2, True, 2.5)
    write_checkpoint(str(tmp_path / "q2"), "qwen2_moe")
    info = hf.read_config(str(tmp_path / "q2"))
    assert (info.config.score, info.config.renormalize, info.shared_ffn) == ("softmax", False, F_SHARED)


def _edit(path, edit):
    """Rewrites the checkpoint at `path` as one file after `edit(tensors)`."""
    t = hf._Tensors(path)
    tensors = {name: t.read(name) for name in t.file_of}
    for file in t.files:
        os.remove(os.path.join(path, file))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
    base = str(tmp_path / "ok")
    write_checkpoint(base, "mixtral")
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"

    def broken(tag, edit):
        path = str(tmp_path / tag)
        write_checkpoint(path, "mixtral")
        _edit(path, edit)
        return path

    with pytest.raises(ValueError, match="lacks tensor '" + name.replace(".", r"\.")):
        hf.load(broken("missing", lambda t: t.pop(name)))
    with pytest.raises(ValueError, match=r"experts\.8\.w1\.weight"):
        hf.load(broken("extra", lambda t: t.__setitem__(
            "model.layers.0.block_sparse_moe.experts.8.w1.weight", np.zeros((F, H), np.float32))))
    with pytest.raises(ValueError, match=r"experts\.3\.w3\.weight' has shape \(8, 15\)"):
        hf.load(broken("shape", lambda t: t.__setitem__(name, np.zeros((F, H - 1), np.float32))))
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(config | {"model_type": "llama"}, f)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        hf.load(base)
    odd = str(tmp_path / "odd")
    write_checkpoint(odd, "qwen3_moe", experts=6)
    with pytest.raises(ValueError, match="num_experts=6 .* not divisible by the EP size 4"):
        hf.load(odd, mesh=make_mesh((4,), ("ep",)))
    with pytest.raises(ValueError, match="not MoE layers"):
        hf.load(odd, layers=[7])


# transformers' configuration class, model class and MoE keys of each architecture.
TRANSFORMERS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=E, intermediate_size=F)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=E, moe_intermediate_size=F, shared_expert_intermediate_size=F_SHARED,
        norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=E, moe_intermediate_size=F, norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=E, moe_intermediate_size=F, intermediate_size=F, n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=4)),
}


@pytest.mark.parametrize("arch", sorted(TRANSFORMERS))
def test_against_transformers(tmp_path, arch):
    """jep's loaded layer against transformers' own MoE block, written by its save_pretrained
    (where torch and transformers are installed: not in CI)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_class, model_class, keys = TRANSFORMERS[arch]
    config = getattr(transformers, config_class)(
        vocab_size=32, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_experts_per_tok=K, **keys)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, value in list(model.named_parameters()) + list(model.named_buffers()):
            if value.is_floating_point() and "rotary" not in name:
                value.normal_(std=0.3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    info, layers = hf.load(str(tmp_path))
    x = np.random.default_rng(0).normal(size=(6, H)).astype(np.float32)
    with torch.no_grad():
        out = model.model.layers[1].mlp(torch.from_numpy(x)[None])
    want = (out[0] if isinstance(out, tuple) else out)[0].numpy()
    got, _ = jep.moe(jnp.asarray(x), layers[1], config=info.config,
                     mesh=make_mesh((1,), ("ep",)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the README's snippet runs the same load and save in the main job
def test_example_loads_fine_tunes_and_saves(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "hf_checkpoint.py"),
                          "--steps", "3", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "qwen3_moe: MoE layers (0, 1)" in run.stdout
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
