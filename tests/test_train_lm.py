"""The training example (examples/train_moe_lm.py): it learns, it is mesh-independent, it
resumes exactly, and expert parameters stay on their EP shard."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_moe_lm.py"
TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--experts", "8", "--ffn", "48",
        "--seq-len", "16", "--batch", "16", "--corpus-mb", "0.2", "--no-progress", "--warmup", "2"]


@pytest.fixture(scope="module")
def example():
    if len(jax.devices()) < 8:
        pytest.skip("the example's meshes need 8 devices")
    spec = importlib.util.spec_from_file_location("train_moe_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses_on_mesh(example, dp, ep, steps, flags=()):
    args = example.parse_args(TINY + ["--dp", str(dp), "--ep", str(ep), "--steps", "10", *flags])
    mesh = example.make_mesh(args)
    train_data, _ = example.load_corpus(int(args.corpus_mb * 2**20))
    model, optimizer, train_step, _ = example.build(args, mesh)
    sharding = NamedSharding(mesh, P(mesh.axis_names, None))
    losses = []
    with jax.set_mesh(mesh):
        for step in range(steps):
            batch = example.sample_batch(train_data, jax.random.fold_in(jax.random.key(0), step),
                                         args.batch, args.seq_len)
            losses.append(float(train_step(model, optimizer, jax.device_put(batch, sharding))[0]))
    return np.array(losses)


def test_same_loss_on_a_dp_ep_mesh_at_step_0_and_after_3_steps(example):
    np.testing.assert_allclose(losses_on_mesh(example, 2, 4, steps=4),
                               losses_on_mesh(example, 1, 8, steps=4), rtol=2e-5)


@pytest.mark.slow
def test_same_loss_on_every_mesh_at_step_0_and_after_3_steps(example):
    want = losses_on_mesh(example, 1, 8, steps=4)
    for dp, ep in [(4, 2), (8, 1)]:
        np.testing.assert_allclose(losses_on_mesh(example, dp, ep, steps=4), want, rtol=2e-5,
                                   err_msg=f"mesh dp={dp} ep={ep}")
    # The EP axis as (node, local) axes, each token once per node, then inside the node.
    for mode in ("flat", "hierarchical"):
        np.testing.assert_allclose(
            losses_on_mesh(example, 2, 4, steps=4, flags=["--nodes", "2", "--dispatch-mode", mode]),
            want, rtol=2e-5, err_msg=f"--nodes 2 --dispatch-mode {mode}")


@pytest.mark.slow  # FP8 layers against bf16 ones: test_fp8.py and test_hierarchical.py, main job
def test_fp8_training_steps_stay_close_to_the_default_ones(example):
    """--fp8 (FP8 dispatch and experts): the same model and batches, losses within FP8's error
    of the default precision's over a few steps, and not identical to them."""
    flags = ["--d-model", "128", "--ffn", "128"]
    want = losses_on_mesh(example, 2, 4, steps=3, flags=flags)
    got = losses_on_mesh(example, 2, 4, steps=3, flags=flags + ["--fp8"])
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert not np.array_equal(got, want)


@pytest.mark.slow  # tests/test_multiprocess.py runs the layer over two processes in the main job
def test_two_processes_train_like_one(example, tmp_path):
    """The example as two processes of 4 CPU devices (jax.distributed on localhost) gives the
    losses it gives in one process of 8."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU processes on localhost")
    flags = TINY + ["--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--ckpt-every", "3",
                    "--nodes", "2", "--dispatch-mode", "hierarchical"]
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(EXAMPLE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen(
        [sys.executable, str(EXAMPLE), *flags, "--out", str(tmp_path / "two"),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the two processes did not finish within 300 s")
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    assert "plot in" in logs[0] and "plot in" not in logs[1]  # process 0 reports and writes
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = example.train(example.parse_args(flags + ["--out", str(tmp_path / "one")]))
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=2e-5)
    np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=2e-5)


def test_loss_decreases_and_plot_and_metrics_are_written(example, tmp_path):
    args = example.parse_args(TINY + ["--steps", "40", "--eval-every", "20", "--out", str(tmp_path)])
    history = example.train(args)
    first, last = np.mean(history["loss"][:5]), np.mean(history["loss"][-5:])
    assert last < 0.8 * first, (first, last)
    assert len(history["eval_loss"]) == 2 and history["eval_loss"][1] < history["eval_loss"][0]
    assert (tmp_path / "training.png").stat().st_size > 10_000
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("balance", [
    [],
    # The selection bias is state the checkpoint must keep; reroute under a tight capacity.
    pytest.param(["--balance", "bias", "--bias-rate", "0.01", "--capacity-factor", "0.8",
                  "--overflow", "reroute"], marks=pytest.mark.slow),
    # Replicated experts, re-placed every 2 steps: placements and moments move; resume is exact.
    pytest.param(["--replicas", "4", "--replace-every", "2"], marks=pytest.mark.slow),
], ids=["aux-loss", "bias-reroute", "replicas"])
def test_checkpoint_round_trip_continues_training_identically(example, tmp_path, balance):
    common = TINY + balance + ["--ckpt-every", "3", "--eval-every", "100", "--out", str(tmp_path)]
    straight = example.train(example.parse_args(common + ["--steps", "6"]))
    # Throw away the last checkpoint: resume from step 3 and train steps 3..5 again.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    resumed = example.train(example.parse_args(common + ["--steps", "6", "--resume"]))
    assert resumed["step"] == straight["step"]
    np.testing.assert_array_equal(resumed["loss"], straight["loss"])


def test_expert_parameters_are_never_all_gathered_in_a_training_step(example):
    args = example.parse_args(TINY + ["--dp", "2", "--ep", "4"])
    mesh = example.make_mesh(args)
    model, optimizer, train_step, _ = example.build(args, mesh)
    batch = jax.device_put(np.zeros((args.batch, args.seq_len + 1), np.int32),
                           NamedSharding(mesh, P(("dp", "ep"), None)))
    with jax.set_mesh(mesh):
        hlo = train_step.lower(model, optimizer, batch).compile().as_text()
    full_shapes = {f"{args.experts},{args.d_model},{args.ffn}", f"{args.experts},{args.ffn},{args.d_model}"}
    gathered = re.findall(r"= \w+\[([\d,]+)\][^=]*? all-gather", hlo)
    assert not full_shapes & set(gathered), gathered
    # Expert gradients are summed over dp only: every all-reduce of a local expert shard has
    # replica groups of dp devices.
    local = f"f32[{args.experts // args.ep},{args.d_model},{args.ffn}]"
    reductions = [line for line in hlo.splitlines() if "all-reduce(" in line and local in line]
    assert reductions
    for line in reductions:
        groups = re.search(r"replica_groups=\{((?:\{[\d,]+\},?)+)\}", line).group(1)
        assert {len(g.split(",")) for g in re.findall(r"\{([\d,]+)\}", groups)} == {args.dp}, line
    # ...and each device holds (and updates) only its own experts.
    w_gate = model.blocks[0].moe.params["w_gate"][...]
    assert w_gate.addressable_shards[0].data.shape == (args.experts // 4, args.d_model, args.ffn)


@pytest.mark.parametrize("flags, message", [
    (["--ep", "3"], "--experts 8 must be divisible by --ep 3"),
    (["--dp", "4", "--ep", "4"], "needs 16 devices"),
    (["--top-k", "9"], "--top-k 9 must be at most --experts 8"),
    (["--batch", "12"], "--batch 12 must be divisible"),
    (["--heads", "3"], "divisible by --heads 3"),
    (["--steps", "0"], ">= 1"),
    (["--backend", "pigeon"], "invalid choice"),
    (["--replicas", "3"], "--replicas 3 must be divisible by --ep 4"),
    (["--overflow", "spill"], "invalid choice"),
    (["--replicas", "4", "--overflow", "reroute"], "--replicas works with --overflow position only"),
    (["--nodes", "3"], "--ep 4 must be divisible by --nodes 3"),
    (["--dispatch-mode", "hierarchical"], "--dispatch-mode hierarchical needs --nodes > 1"),
    (["--num-processes", "2"], "--num-processes needs --coordinator"),
    (["--fp8", "--d-model", "96"], "--fp8 needs --d-model and --ffn multiples of 128"),
])
def test_bad_flags_give_clear_messages(example, capsys, flags, message):
    with pytest.raises(SystemExit):
        example.parse_args(flags)
    assert message in capsys.readouterr().err


def test_help_documents_every_flag(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = set(re.findall(r'a\("(--[\w-]+)"', EXAMPLE.read_text()))
    assert flags and all(flag in text for flag in flags)
    assert all(f"{flag}" in text for flag in ("--resume", "--ckpt-every", "--capacity-factor"))


def test_generate_decodes_a_checkpoint_as_the_full_forward_does(example, tmp_path):
    """examples/generate.py: the low-latency MoE layers give the tokens the flat ones give, and a
    step through the key/value caches gives the full forward's logits."""
    run = tmp_path / "run"
    example.main(TINY + ["--steps", "3", "--ckpt-every", "3", "--eval-every", "3",
                         "--eval-batches", "1", "--out", str(run)])
    spec = importlib.util.spec_from_file_location("generate", EXAMPLE.parent / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    flags = ["--run", str(run), "--prompt-len", "6", "--new-tokens", "8"]
    low_latency = generate.main(flags)
    np.testing.assert_array_equal(low_latency, generate.main(flags + ["--mode", "flat"]))
    assert low_latency.shape == (8, 8)

    decoder, _, mesh, _ = generate.load(str(run), "low_latency")
    tokens = np.random.default_rng(0).integers(0, 256, (8, 10)).astype(np.int32)
    step = nnx.jit(lambda model, t, position: model.decode_step(t, position))
    with jax.set_mesh(mesh):
        full = np.asarray(nnx.jit(lambda model, t: model(t)[0])(decoder, tokens))
        decoder.init_cache(8)
        stepped = np.stack([np.asarray(step(decoder, tokens[:, p:p + 1], p)) for p in range(10)],
                           axis=1)
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-4)
