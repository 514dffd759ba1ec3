"""Greedy generation from a checkpoint of examples/train_moe_lm.py, with the MoE layers in
low-latency mode (`jep.low_latency`: one custom call each for dispatch and combine).

It rebuilds the model from the run's `args.json`, loads the latest checkpoint's parameters,
takes `--batch` prompts from the held-out part of the corpus and continues each for
`--new-tokens` bytes, one token per sequence per step with key/value caches: every step each
MoE layer moves `--batch` tokens over the same mesh as training (dp x ep). It prints a few
continuations and the decoding speed.

    python examples/train_moe_lm.py                # writes out/train_moe_lm
    python examples/generate.py --run out/train_moe_lm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_moe_lm as train  # noqa: E402

import jep  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/train_moe_lm",
                   help="the training run's folder (its --out): args.json and checkpoints/")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences decoded together (default: the mesh's devices, one each)")
    p.add_argument("--prompt-len", type=int, default=16, help="bytes of each prompt")
    p.add_argument("--new-tokens", type=int, default=48, help="bytes to generate per sequence")
    p.add_argument("--mode", default="low_latency", choices=("low_latency", "flat"),
                   help="dispatch mode of the MoE layers (flat: jep.dispatch, to compare)")
    p.add_argument("--show", type=int, default=3, help="continuations to print")
    return p.parse_args(argv)


def load(run: str, mode: str):
    """The trained model, rebuilt for decoding with the MoE layers in `mode`, and its args."""
    path = os.path.join(run, "args.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: train first (python examples/train_moe_lm.py "
                         f"--out {run})")
    with open(path) as f:
        args = argparse.Namespace(**json.load(f), coordinator=None, num_processes=1, process_id=0,
                                  resume=True, no_progress=True)
    mesh = train.make_mesh(args)
    model, optimizer, _, _ = train.build(args, mesh)
    manager = train.checkpoint_manager(os.path.join(run, "checkpoints"))
    if manager.latest_step() is None:
        raise SystemExit(f"no checkpoint in {run}/checkpoints")
    step, _ = train.restore(manager, model, optimizer)
    manager.close()
    # The same parameters in a model whose MoE layers dispatch in `mode`.
    config = model.blocks[0].moe.config
    config = dataclasses.replace(config, dispatch=dataclasses.replace(config.dispatch, mode=mode))
    with jax.set_mesh(mesh):
        decoder = train.LM(args, config, nnx.Rngs(0))
    nnx.update(decoder, nnx.state(model, train.MODEL_STATE))
    decoder.eval()  # the selection bias, if any, is used, not updated
    return decoder, args, mesh, step


def generate(decoder, prompts: np.ndarray, new_tokens: int, mesh):
    """Greedy continuation of i32[B, L] prompts: (i32[B, new_tokens], seconds per step of the
    generated tokens, after the first)."""
    batch, length = prompts.shape
    step = nnx.jit(lambda model, tokens, position: model.decode_step(tokens, position))
    out, times = [], []
    with jax.set_mesh(mesh):
        decoder.init_cache(batch)
        for position in range(length):  # the prompt, a token at a time, through the caches
            logits = step(decoder, jnp.asarray(prompts[:, position:position + 1]), position)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        for position in range(length, length + new_tokens):
            start = time.perf_counter()
            out.append(np.asarray(token))  # waits for the step
            times.append(time.perf_counter() - start)
            if position + 1 < length + new_tokens:
                start = time.perf_counter()
                logits = step(decoder, token[:, None], position)
                token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                times[-1] += time.perf_counter() - start
    return np.stack(out, axis=1), float(np.median(times[1:])) if len(times) > 1 else float("nan")


def main(argv=None):
    flags = parse_args(argv)
    decoder, args, mesh, step = load(flags.run, flags.mode)
    batch = flags.batch or mesh.size
    if batch % mesh.size:
        raise SystemExit(f"--batch {batch} must be divisible by the mesh's {mesh.size} devices")
    if flags.prompt_len + flags.new_tokens > args.seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens must be at most the trained sequence "
                         f"length {args.seq_len}")
    _, held_out = train.load_corpus(int(args.corpus_mb * 2**20))
    prompts = train.sample_batch(held_out, jax.random.key(1), batch, flags.prompt_len)[:, :-1]
    tokens, seconds = generate(decoder, prompts, flags.new_tokens, mesh)
    print(f"jax {jax.__version__}, {mesh.size} x {jax.devices()[0].device_kind}; checkpoint of "
          f"step {step}; MoE dispatch mode {flags.mode}; {batch} sequences, "
          f"{batch // mesh.size} token(s) per device per step")
    for prompt, continuation in list(zip(prompts, tokens))[:flags.show]:
        text = lambda a: bytes(a.astype(np.uint8)).decode("utf-8", "replace")  # noqa: E731
        print(f"  {text(prompt)!r} -> {text(continuation)!r}")
    print(f"{batch / seconds:,.0f} tokens/s ({seconds * 1e3:.2f} ms per step of {batch} tokens, "
          "median)")
    return tokens


if __name__ == "__main__":
    main()
