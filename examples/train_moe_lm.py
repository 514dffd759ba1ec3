"""Trains a small byte-level decoder-only transformer with an MoE FFN in every block.

The corpus is the Python standard library's own `.py` sources, read as bytes (every machine with
Python has it), with the last 5% held out. The model runs over a `(dp, ep)` mesh: tokens split
over both axes, experts over `ep`, the rest replicated (with `--nodes N`, `ep` is split into
`(node, local)`, and `--dispatch-mode hierarchical` sends each token once to each node). With
`--coordinator`, `--num-processes` and `--process-id` it runs as one of several processes joined
by `jax.distributed` (one per host or per GPU; on CPUs through gloo). It trains with optax AdamW (warm-up then
cosine decay, gradient clipping) in one jitted step, shows a progress bar, evaluates the held-out
loss, checkpoints with orbax (`--resume` continues from the last one) and writes a PNG of the loss
and of the expert load over time. Without accelerators it runs on 8 simulated CPU devices.

    python examples/train_moe_lm.py                   # a few minutes on a 2-core CPU
    python examples/train_moe_lm.py --steps 600 --resume
    python examples/train_moe_lm.py --fp8            # FP8 dispatch and expert products
    # two processes of 4 CPU devices on one machine (start both):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_moe_lm.py \
        --coordinator localhost:12355 --num-processes 2 --process-id 0 --nodes 2 \
        --dispatch-mode hierarchical
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU platform reads this; on a GPU machine the GPUs are used as they are.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jep  # noqa: E402

VOCAB = 256  # bytes


# --- data -----------------------------------------------------------------------------------

def load_corpus(max_bytes: int, held_out: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The standard library's .py files, in sorted order, as uint8 (train, held-out)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    chunks, size = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    corpus = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
    split = int(len(corpus) * (1 - held_out))
    return corpus[:split], corpus[split:]


def sample_batch(corpus: np.ndarray, key, batch: int, seq_len: int) -> np.ndarray:
    """i32[batch, seq_len + 1] random windows; the same key gives the same batch (for --resume)."""
    starts = np.asarray(jax.random.randint(key, (batch,), 0, len(corpus) - seq_len - 1))
    return np.stack([corpus[s:s + seq_len + 1] for s in starts]).astype(np.int32)


# --- model ----------------------------------------------------------------------------------

class Block(nnx.Module):
    def __init__(self, args, config, rngs):
        self.attn_norm = nnx.RMSNorm(args.d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=args.heads, in_features=args.d_model, decode=False, deterministic=True,
            keep_rngs=False, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(args.d_model, rngs=rngs)
        self.moe = jep.nnx.MoE(args.d_model, args.ffn, config=config, shared_ffn=args.shared_ffn,
                               rngs=rngs,
                               bias_rate=args.bias_rate if args.balance == "bias" else 0.0,
                               num_replicas=args.replicas)

    def __call__(self, x, mask, decode=False):
        x = x + self.attn(self.attn_norm(x), mask=mask, decode=decode)
        y, aux = self.moe(self.moe_norm(x))
        return x + y, aux


class LM(nnx.Module):
    """tokens i32[B, S] -> logits f32[B, S, 256], and the MoE aux of every block."""

    def __init__(self, args, config, rngs):
        self.embed = nnx.Embed(VOCAB, args.d_model, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (args.seq_len, args.d_model)))
        self.blocks = nnx.List([Block(args, config, rngs) for _ in range(args.layers)])
        self.norm = nnx.RMSNorm(args.d_model, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        auxes = []
        for block in self.blocks:
            x, aux = block(x, mask)
            auxes.append(aux)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)  # a leading [layers] axis
        return self.embed.attend(self.norm(x)), aux

    def init_cache(self, batch: int, dtype=jnp.float32):
        """Key/value caches for `decode_step`, for sequences up to the trained length."""
        for block in self.blocks:
            block.attn.init_cache((batch, self.position.shape[0], self.embed.features), dtype)

    def decode_step(self, tokens, position):
        """tokens i32[B, 1] at `position` (after `init_cache` and the tokens before it) ->
        logits f32[B, 256] of the next token."""
        x = self.embed(tokens) + jax.lax.dynamic_slice_in_dim(self.position[...], position, 1)
        for block in self.blocks:
            x, _ = block(x, None, decode=True)
        return self.embed.attend(self.norm(x))[:, 0]


def loss_fn(model, batch, args):
    logits, aux = model(batch[:, :-1])
    task = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    balance_coef = args.balance_coef if args.balance == "aux" else 0.0
    total = (task + balance_coef * aux["load_balancing_loss"].sum()
             + args.z_coef * aux["router_z_loss"].sum())
    return total, (task, aux)


def build(args, mesh):
    """Model, optimizer and jitted steps, created sharded on `mesh`."""
    config = jep.MoEConfig(
        num_experts=args.experts, top_k=args.top_k, axis_name=ep_axes(args),
        expert_precision="fp8" if getattr(args, "fp8", False) else "bf16",
        dispatch=jep.DispatchConfig(capacity_factor=args.capacity_factor, overflow=args.overflow,
                                    backend=args.backend, mode=args.dispatch_mode,
                                    fp8=getattr(args, "fp8", False)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=args.warmup, decay_steps=max(args.steps, args.warmup + 1),
        end_value=args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(args.clip),
                     optax.adamw(schedule, b2=0.95, weight_decay=args.weight_decay))
    with jax.set_mesh(mesh):
        model = LM(args, config, nnx.Rngs(args.seed))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        grads, (task, aux) = nnx.grad(loss_fn, has_aux=True)(model, batch, args)
        optimizer.update(model, grads)
        return task, aux

    @nnx.jit
    def eval_step(model, batch):
        return loss_fn(model, batch, args)[1][0]

    return model, optimizer, train_step, eval_step


# --- checkpoints ----------------------------------------------------------------------------

def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))


# What a checkpoint keeps of the model: its parameters and the MoE layers' selection biases and
# expert placements.
MODEL_STATE = (nnx.Param, jep.nnx.SelectionBias, jep.nnx.ExpertPlacement)


def save(manager, step, model, optimizer, history):
    state = {"model": nnx.state(model, MODEL_STATE), "optimizer": nnx.state(optimizer)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              history=ocp.args.JsonSave(history)))
    manager.wait_until_finished()


def restore(manager, model, optimizer) -> tuple[int, dict]:
    """Loads the latest checkpoint into model and optimizer (keeping their shardings)."""
    step = manager.latest_step()
    target = {"model": nnx.state(model, MODEL_STATE), "optimizer": nnx.state(optimizer)}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()))
    nnx.update(model, restored["state"]["model"])
    nnx.update(optimizer, restored["state"]["optimizer"])
    return step, restored["history"]


# --- the run --------------------------------------------------------------------------------

# Flags of one run that do not describe the model.
RUN_ONLY = ("coordinator", "num_processes", "process_id", "resume", "no_progress")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--steps", type=int, default=200, help="optimizer steps in all (a resumed run continues to this)")
    a("--batch", type=int, default=16, help="sequences per step, over all devices")
    a("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    a("--d-model", type=int, default=128, help="model width H")
    a("--layers", type=int, default=2, help="transformer blocks, each with an MoE FFN")
    a("--heads", type=int, default=4, help="attention heads")
    a("--experts", type=int, default=8, help="routed experts E per MoE layer")
    a("--top-k", type=int, default=2, help="experts per token k")
    a("--ffn", type=int, default=256, help="hidden width F of each routed expert")
    a("--shared-ffn", type=int, default=0, help="hidden width of a shared (always-on) expert; 0: none")
    a("--dp", type=int, default=2, help="data-parallel mesh axis size")
    a("--ep", type=int, default=4, help="expert-parallel mesh axis size")
    a("--nodes", type=int, default=1,
      help="split the EP axis into (node, local) axes of --nodes x --ep / --nodes")
    a("--dispatch-mode", default="flat", choices=("flat", "hierarchical"),
      help="with --nodes > 1: one exchange over both EP axes (flat) or each token once per node, "
           "then inside the node (hierarchical)")
    a("--coordinator", default=None,
      help="HOST:PORT of process 0, for a run of several processes (jax.distributed)")
    a("--num-processes", type=int, default=1, help="processes of the run (with --coordinator)")
    a("--process-id", type=int, default=0, help="this process's index (with --coordinator)")
    a("--capacity-factor", type=float, default=None, help="per-expert capacity factor; default dropless")
    a("--overflow", default="position", choices=jep.balance.OVERFLOW,
      help="with a capacity: drop by position, drop the lowest router probability, or reroute")
    a("--backend", default="auto", choices=("auto",) + jep.transport.names(), help="dispatch transport")
    a("--fp8", action="store_true",
      help="DeepSeek-V3's FP8 recipe: tokens dispatched as e4m3 with a scale per 128 channels, "
           "the expert products in FP8 (1 x 128 activation and 128 x 128 weight tiles; emulated: "
           "FP8's numerics, not its speed); --d-model and --ffn multiples of 128, flat dispatch")
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--warmup", type=int, default=30, help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    a("--clip", type=float, default=1.0, help="gradient clipping by global norm")
    a("--balance", default="aux", choices=("aux", "bias", "none"),
      help="load balancing: the Switch loss (aux), DeepSeek-V3's aux-loss-free selection bias "
           "(bias), or neither")
    a("--balance-coef", type=float, default=1e-2, help="weight of the load-balancing loss (per layer; --balance aux)")
    a("--bias-rate", type=float, default=1e-3, help="step of the selection-bias rule (--balance bias)")
    a("--replicas", type=int, default=0, help="redundant copies of hot experts per MoE layer (EPLB)")
    a("--replace-every", type=int, default=50,
      help="steps between re-placements of the replicated experts, from the loads of those steps")
    a("--z-coef", type=float, default=1e-3, help="weight of the router z-loss (per layer)")
    a("--corpus-mb", type=float, default=4.0, help="megabytes of standard-library source to read")
    a("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    a("--eval-batches", type=int, default=4, help="batches per held-out evaluation")
    a("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    a("--out", default="out/train_moe_lm", help="folder for checkpoints, the plot and the metrics")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--seed", type=int, default=0, help="random seed (initialization and batches)")
    a("--no-progress", action="store_true", help="no progress bar (for logs)")
    args = p.parse_args(argv)
    if args.fp8 and (args.d_model % 128 or args.ffn % 128 or args.dispatch_mode != "flat"):
        p.error("--fp8 needs --d-model and --ffn multiples of 128 and --dispatch-mode flat")
    if args.coordinator is not None:
        if not 0 <= args.process_id < args.num_processes:
            p.error(f"--process-id {args.process_id} must be in [0, --num-processes "
                    f"{args.num_processes})")
        if args.replicas:
            p.error("--replicas re-places experts from the host: one process only")
        # CPU collectives across processes (GPUs use NCCL whatever this says). Nothing may ask
        # for the devices before initialize.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.num_processes != 1:
        p.error("--num-processes needs --coordinator")

    devices = len(jax.devices())
    if min(args.steps, args.batch, args.seq_len, args.d_model, args.layers, args.heads, args.experts,
           args.top_k, args.ffn, args.dp, args.ep) < 1:
        p.error("sizes and counts must be >= 1")
    if args.dp * args.ep > devices:
        p.error(f"--dp {args.dp} x --ep {args.ep} needs {args.dp * args.ep} devices; {devices} present")
    if args.experts % args.ep:
        p.error(f"--experts {args.experts} must be divisible by --ep {args.ep}")
    if args.replicas < 0 or (args.experts + args.replicas) % args.ep:
        p.error(f"--experts {args.experts} + --replicas {args.replicas} must be divisible by "
                f"--ep {args.ep} (and --replicas >= 0)")
    if args.replace_every < 1:
        p.error("--replace-every must be >= 1")
    if args.replicas and args.overflow != "position":
        p.error(f"--replicas works with --overflow position only, got --overflow {args.overflow}")
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} must be at most --experts {args.experts}")
    if args.batch % (args.dp * args.ep):
        p.error(f"--batch {args.batch} must be divisible by --dp x --ep = {args.dp * args.ep}")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if args.nodes < 1 or args.ep % args.nodes:
        p.error(f"--ep {args.ep} must be divisible by --nodes {args.nodes}")
    if args.dispatch_mode == "hierarchical" and args.nodes == 1:
        p.error("--dispatch-mode hierarchical needs --nodes > 1")
    return args


def ep_axes(args):
    """The EP axis, or its (node, local) pair with --nodes > 1."""
    return ("node", "local") if args.nodes > 1 else "ep"


def make_mesh(args):
    names = ("dp", "node", "local") if args.nodes > 1 else ("dp", "ep")
    shape = (args.dp, args.nodes, args.ep // args.nodes) if args.nodes > 1 else (args.dp, args.ep)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=jax.devices()[: args.dp * args.ep])


def place_batch(batch: np.ndarray, sharding):
    """A global array of `batch` (the same in every process) split by `sharding`: each process
    puts the rows of its own devices."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def is_main_process() -> bool:
    return jax.process_index() == 0


def evaluate(eval_step, model, held_out, args, sharding) -> float:
    key = jax.random.key(args.seed + 1)  # the same held-out batches every time
    model.eval()  # the selection bias (--balance bias) is used, not updated
    losses = [eval_step(model, place_batch(sample_batch(held_out, jax.random.fold_in(key, i),
                                                        args.batch, args.seq_len), sharding))
              for i in range(args.eval_batches)]
    model.train()
    return float(np.mean(losses))


def plot(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_load, ax_imbalance) = plt.subplots(1, 3, figsize=(16, 4))
    ax_loss.plot(history["step"], history["loss"], label="train", lw=0.8)
    if history["eval_step"]:
        ax_loss.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="loss")
    ax_loss.legend()
    load = np.asarray(history["load"])  # [steps, layers, experts]
    share = load[:, 0] / load[:, 0].sum(-1, keepdims=True)
    image = ax_load.imshow(share.T, aspect="auto", origin="lower", cmap="viridis",
                           extent=(history["step"][0], history["step"][-1], -0.5, share.shape[1] - 0.5))
    ax_load.set(xlabel="step", ylabel="expert", title="share of tokens per expert (block 0)")
    fig.colorbar(image, ax=ax_load)
    imbalance = load.max(-1) / np.maximum(load.mean(-1), 1e-9)  # [steps, layers]
    for layer in range(imbalance.shape[1]):
        ax_imbalance.plot(history["step"], imbalance[:, layer], lw=0.8, label=f"block {layer}")
    ax_imbalance.plot(history["step"], history["rank_imbalance"], "k", lw=0.8,
                      label="EP ranks (worst block)")
    ax_imbalance.set(xlabel="step", ylabel="max / mean tokens", title="imbalance")
    ax_imbalance.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args) -> dict:
    """Runs (or resumes) training; returns the history (loss per step, held-out losses, loads)."""
    os.makedirs(args.out, exist_ok=True)
    if is_main_process():  # for examples/generate.py, which rebuilds the model from them
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k not in RUN_ONLY}, f, indent=1)
    mesh = make_mesh(args)
    train_data, held_out = load_corpus(int(args.corpus_mb * 2**20))
    model, optimizer, train_step, eval_step = build(args, mesh)
    manager = checkpoint_manager(os.path.join(args.out, "checkpoints"))
    history = {"step": [], "loss": [], "load": [], "rank_imbalance": [], "dropped": [],
               "tokens_per_s": [],
               "eval_step": [], "eval_loss": []}
    start = 0
    if args.resume and manager.latest_step() is not None:
        start, history = restore(manager, model, optimizer)
    batch_sharding = NamedSharding(mesh, P(mesh.axis_names, None))
    data_key = jax.random.key(args.seed)
    tokens_per_step = args.batch * args.seq_len

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps,
               disable=args.no_progress or not is_main_process(), dynamic_ncols=True)
    tick = time.perf_counter()
    with jax.set_mesh(mesh):
        for step in bar:
            batch = place_batch(sample_batch(train_data, jax.random.fold_in(data_key, step),
                                             args.batch, args.seq_len), batch_sharding)
            task, aux = train_step(model, optimizer, batch)
            loss = float(task)  # waits for the step
            load = np.asarray(aux["tokens_per_expert"])  # [layers, experts]
            now = time.perf_counter()
            tokens_per_s, tick = tokens_per_step / (now - tick), now
            history["step"].append(step)
            history["loss"].append(loss)
            history["load"].append(load.tolist())
            history["rank_imbalance"].append(float(aux["rank_imbalance"].max()))  # worst block
            history["dropped"].append(int(aux["num_dropped"].sum()))
            history["tokens_per_s"].append(tokens_per_s)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                            imbalance=f"{(load.max(-1) / load.mean(-1)).max():.2f}",
                            rank_imbalance=f"{history['rank_imbalance'][-1]:.2f}",
                            dropped=history["dropped"][-1], refresh=False)
            done = step + 1
            if args.replicas and done % args.replace_every == 0:
                recent = np.asarray(history["load"][-args.replace_every:])  # [steps, layers, E]
                jep.nnx.replace_experts(
                    model, {("blocks", i, "moe"): recent[:, i] for i in range(args.layers)},
                    optimizer)
            if done % args.eval_every == 0 or done == args.steps:
                history["eval_step"].append(done)
                history["eval_loss"].append(evaluate(eval_step, model, held_out, args, batch_sharding))
                if is_main_process():
                    bar.write(f"step {done}: train loss {loss:.4f}, "
                              f"held-out loss {history['eval_loss'][-1]:.4f}")
            if done % args.ckpt_every == 0 or done == args.steps:
                save(manager, done, model, optimizer, history)
    bar.close()
    manager.close()
    if history["step"] and is_main_process():
        plot(history, os.path.join(args.out, "training.png"))
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump({k: v for k, v in history.items() if k != "load"}, f)
    return history


def main(argv=None):
    args = parse_args(argv)
    if is_main_process():
        print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].device_kind} in "
              f"{jax.process_count()} process(es); mesh dp={args.dp} x ep={args.ep}"
              + (f" as {args.nodes} nodes, {args.dispatch_mode} dispatch" if args.nodes > 1 else "")
              + f"; {args.layers} blocks, E={args.experts} top-{args.top_k}")
    history = train(args)
    if history["loss"] and is_main_process():
        # The median of the second half: the first steps include compilation.
        rates = history["tokens_per_s"]
        rate = np.median(rates[len(rates) // 2:])
        print(f"loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f}; held-out "
              f"{history['eval_loss'][-1]:.3f}; {rate:,.0f} tokens/s (median, second half); "
              f"plot in {os.path.join(args.out, 'training.png')}")


if __name__ == "__main__":
    main()
