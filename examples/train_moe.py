"""Trains one MoE layer with expert parallelism to fit a fixed random two-layer "teacher" network.

A small, complete training run: a `(dp, ep)` mesh, `jep.moe` inside a jitted step, optax AdamW
with warm-up and cosine decay, the balancing losses added to the task loss. On a machine without
accelerators it runs on 8 simulated CPU devices.

    python examples/train_moe.py --steps 200
"""

from __future__ import annotations

import argparse
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU platform reads this; on a GPU machine the GPUs are used as they are.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jep  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=512, help="tokens per step, over all devices")
    p.add_argument("--hidden", type=int, default=64, help="H, model width")
    p.add_argument("--ffn", type=int, default=128, help="F, hidden width of each expert")
    p.add_argument("--experts", type=int, default=16, help="E, routed experts")
    p.add_argument("--top-k", type=int, default=2, help="k, experts per token")
    p.add_argument("--dp", type=int, default=2, help="data-parallel mesh axis size")
    p.add_argument("--ep", type=int, default=4, help="expert-parallel mesh axis size")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="per-expert capacity factor; default dropless")
    p.add_argument("--backend", default="auto", help="transport: auto, reference or xla")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    p.add_argument("--balance-coef", type=float, default=1e-2, help="weight of the balancing loss")
    p.add_argument("--z-coef", type=float, default=1e-3, help="weight of the router z-loss")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


def train(args) -> list[float]:
    """Runs the training loop; returns the task loss of every step."""
    devices = jax.devices()
    if len(devices) < args.dp * args.ep:
        raise SystemExit(f"--dp {args.dp} x --ep {args.ep} needs {args.dp * args.ep} devices, "
                         f"{len(devices)} present")
    mesh = jax.make_mesh((args.dp, args.ep), ("dp", "ep"), devices=devices[: args.dp * args.ep])
    config = jep.MoEConfig(
        num_experts=args.experts, top_k=args.top_k, axis_name="ep",
        dispatch=jep.DispatchConfig(capacity_factor=args.capacity_factor, backend=args.backend))
    key_teacher, key_student, key_data = jax.random.split(jax.random.key(args.seed), 3)
    key_a, key_b = jax.random.split(key_teacher)
    teacher_in = jax.random.normal(key_a, (args.hidden, 4 * args.hidden)) / args.hidden**0.5
    teacher_out = jax.random.normal(key_b, (4 * args.hidden, args.hidden)) / (4 * args.hidden) ** 0.5
    params = jep.init_params(key_student, hidden=args.hidden, ffn=args.ffn, config=config)

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=args.steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = optimizer.init(params)

    def loss_fn(params, x):
        target = jnp.tanh(x @ teacher_in) @ teacher_out
        y, aux = jep.moe(x, params, config=config, mesh=mesh)
        task = jnp.mean((y - target) ** 2) / jnp.mean(target**2)
        total = task + args.balance_coef * aux["load_balancing_loss"] + args.z_coef * aux["router_z_loss"]
        return total, (task, aux)

    @jax.jit
    def step(params, opt_state, x):
        grads, (task, aux) = jax.grad(loss_fn, has_aux=True)(params, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, task, aux

    losses = []
    mark, mark_step = time.perf_counter(), 0
    for i in range(args.steps):
        x = jax.random.normal(jax.random.fold_in(key_data, i), (args.batch, args.hidden))
        params, opt_state, task, aux = step(params, opt_state, x)
        losses.append(float(task))  # float() waits for the step
        if i % args.log_every == 0 or i == args.steps - 1:
            now = time.perf_counter()
            # Step 0 includes compilation; later lines time the steps since the previous line.
            speed = (f"{now - mark:.1f} s with compilation" if i == 0
                     else f"{(i - mark_step) * args.batch / (now - mark):,.0f} tokens/s")
            mark, mark_step = now, i
            load = np.asarray(aux["tokens_per_expert"])
            print(f"step {i:5d}  loss {losses[-1]:.4f}  load max/mean {load.max() / load.mean():.2f}  "
                  f"dropped {int(aux['num_dropped'])}  {speed}", flush=True)
    return losses


def main(argv=None):
    args = parse_args(argv)
    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].device_kind}; "
          f"mesh dp={args.dp} ep={args.ep}; E={args.experts} top-{args.top_k}")
    losses = train(args)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
