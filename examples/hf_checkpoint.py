"""A HuggingFace-layout MoE checkpoint in and out of jep: load it onto a mesh, fine-tune its MoE
layers a few steps, save it back in HF layout.

Nothing can be downloaded here, so the example first writes a small Qwen3-MoE-layout checkpoint
itself (config.json + model.safetensors with HF's tensor names, random bf16 weights). With a real
one, point `--checkpoint` at its directory.

    python examples/hf_checkpoint.py [--checkpoint DIR] [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import jep  # noqa: E402
from jep.interop import hf  # noqa: E402


def write_small_qwen3_moe(path: str, *, hidden=64, ffn=32, experts=16, top_k=4, layers=2, seed=0):
    """A Qwen3-MoE-layout checkpoint: each layer's router and experts (HF's [out, in] weights),
    attention and norms (kept as they are by jep, copied by `hf.save`), random bf16."""
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(ml_dtypes.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(128, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = weight(hidden, hidden)
        tensors[p + "mlp.gate.weight"] = weight(experts, hidden)
        for e in range(experts):
            tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = weight(ffn, hidden)
            tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = weight(ffn, hidden)
            tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = weight(hidden, ffn)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "qwen3_moe", "hidden_size": hidden, "num_hidden_layers": layers,
              "num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": ffn,
              "norm_topk_prob": True, "hidden_act": "silu", "vocab_size": 128}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an HF checkpoint directory (default: write a small one)")
    parser.add_argument("--out", help="where to save the fine-tuned checkpoint (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="jep_hf_")
    source = args.checkpoint or os.path.join(work, "qwen3_moe_small")
    if not args.checkpoint:
        write_small_qwen3_moe(source)
    out = args.out or os.path.join(work, "finetuned")

    # Experts over an "ep" axis of every device (its size must divide E), tokens over all of them.
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("ep",))
    info, layers = hf.load(source, mesh=mesh)
    print(f"{info.architecture}: MoE layers {info.moe_layers}, E={info.config.num_experts}, "
          f"k={info.config.top_k}, H={info.hidden}, F={info.ffn}, on {n} devices; "
          f"w_gate {layers[info.moe_layers[0]]['w_gate'].dtype} "
          f"{layers[info.moe_layers[0]]['w_gate'].sharding.spec}")

    # Fine-tune every MoE layer (the layers stacked one after another with a residual) toward a
    # fixed random target; the bf16 experts are trained through f32 master copies.
    master = jax.tree.map(lambda a: a.astype(jnp.float32), layers)
    key_x, key_t = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (args.tokens, info.hidden), jnp.float32)
    target = jax.random.normal(key_t, (args.tokens, info.hidden), jnp.float32)
    x, target = (jax.device_put(a, jax.NamedSharding(mesh, jax.P("ep"))) for a in (x, target))

    def loss_fn(params):
        h, aux_loss = x, 0.0
        for i in info.moe_layers:
            y, aux = jep.moe(h, params[i], config=info.config, mesh=mesh)
            h, aux_loss = h + y, aux_loss + aux["load_balancing_loss"]
        return jnp.mean((h - target) ** 2) + 0.01 * aux_loss

    optimizer = optax.adam(1e-3)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = optimizer.init(master)
    for s in range(args.steps):
        master, state, loss = step(master, state)
        if s in (0, args.steps - 1):
            print(f"step {s}: loss {float(loss):.4f}")

    # Back in the checkpoint's dtypes and layout; everything that is not a MoE tensor is copied.
    tuned = jax.tree.map(lambda m, a: m.astype(a.dtype), master, layers)
    hf.save(out, tuned, source=source)
    _, again = hf.load(out, mesh=mesh)
    # The router (float32 in jep) went out in the checkpoint's dtype: equal up to that rounding.
    error = max(float(jnp.max(jnp.abs(again[i][k].astype(jnp.float32) - tuned[i][k].astype(jnp.float32))
                          / (jnp.max(jnp.abs(tuned[i][k].astype(jnp.float32))) + 1e-30)))
                for i in tuned for k in tuned[i])
    print(f"saved to {out}; reloaded, largest difference {error:.1e} of each tensor's scale")
    return error < 2**-8


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
