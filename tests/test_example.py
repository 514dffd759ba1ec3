"""The README's main job trains: its loss falls over a short run."""

import importlib.util
import pathlib

import jax
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_moe.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_moe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_example_loss_decreases():
    if len(jax.devices()) < 8:
        pytest.skip("the example's default mesh needs 8 devices")
    example = load_example()
    losses = example.train(example.parse_args(["--steps", "60", "--batch", "256", "--log-every", "1000"]))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_example_help_documents_every_flag(capsys):
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--steps", "--batch", "--experts", "--top-k", "--dp", "--ep", "--capacity-factor",
                 "--backend", "--lr", "--seed"):
        assert flag in text
