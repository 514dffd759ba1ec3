"""Typing a kernel's result as varying over the mesh axes its inputs vary over.

Inside `shard_map` (with check_vma), an XLA FFI call or a Pallas kernel returns values typed as
invariant whatever its inputs; `custom_vjp` rules then reject their cotangents. `vary_like`
gives a result the type its inputs imply.
"""

from __future__ import annotations

import jax
from jax import lax


def varying(x) -> frozenset:
    """The mesh axes x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None)
        vma = mat.varying if mat is not None else ()
    return frozenset(vma)


def vary_like(out, *inputs):
    """`out` typed as varying over every mesh axis one of `inputs` varies over."""
    missing = tuple(sorted(frozenset().union(*map(varying, inputs)) - varying(out)))
    return lax.pcast(out, missing, to="varying") if missing else out
