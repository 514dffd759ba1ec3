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


def concrete_mesh():
    """The mesh set with `jax.set_mesh`, with its devices, also while tracing under `jax.jit`
    (where the public `jax.sharding.get_mesh` refuses and `get_abstract_mesh` has no devices);
    None where none is set or this jax cannot say. The one use of a private JAX module in jep:
    JAX has no public call for it yet (0.10-0.11)."""
    try:
        from jax._src import mesh as mesh_lib
    except ImportError:
        return None
    getter = getattr(mesh_lib, "get_concrete_mesh", None)
    mesh = getter() if getter is not None else None
    return None if mesh is None or mesh.empty else mesh
