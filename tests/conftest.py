"""Test set-up: 8 simulated CPU devices (set before jax is imported) and mesh helpers."""

import contextlib
import os
import zlib

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

# The tests compare float32 paths with float64 references at ~1e-5: no TF32 on GPUs.
jax.config.update("jax_default_matmul_precision", "highest")
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402


def make_mesh(shape, names, explicit=True):
    """A mesh over the first devices, or a skip when there are too few of them."""
    size = int(np.prod(shape))
    if len(jax.devices()) < size:
        pytest.skip(f"needs {size} devices, {len(jax.devices())} present")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape),
                         devices=jax.devices()[:size])


def put(mesh, array, spec):
    return jax.device_put(array, NamedSharding(mesh, spec))


@contextlib.contextmanager
def counting_compiles():
    """A list that gains an entry (its duration) for each XLA compile inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def rng(request):
    """A generator per test, seeded by the test's id and JEP_SEED (default 0): runs reproduce,
    and another JEP_SEED draws fresh inputs."""
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("JEP_SEED", "0"))
    return np.random.default_rng(seed)


__all__ = ["P", "counting_compiles", "make_mesh", "put"]
