"""Where the code being traced will run: the platform of the mesh, and whether it is a Hopper GPU
(where the Pallas Mosaic GPU kernels of `jep_kernels` run)."""

from __future__ import annotations

import jax


def current_platform() -> str:
    """The platform of the mesh being traced over ("cpu", "gpu", "tpu"), else the default."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def on_hopper() -> bool:
    """Whether the current platform is an NVIDIA GPU of compute capability 9.x."""
    if current_platform() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
