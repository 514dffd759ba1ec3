"""Transports: how token rows cross the EP axis. One module per backend, one registry.

A transport is one function, `exchange`, called inside `shard_map` over `axis_name`:

    exchange(rows, send_sizes, recv_sizes, *, axis_name, out_rows, max_rows_per_peer) -> out

  rows:        [N, *F], the rows for peer p at `exclusive_cumsum(send_sizes)[p]`, peer 0 first.
  send_sizes:  i32[n], rows this rank sends to each peer.
  recv_sizes:  i32[n], rows this rank receives from each peer (what the peers' send_sizes say).
  out:         [out_rows, *F], the rows from peer p at `exclusive_cumsum(recv_sizes)[p]`, in the
               order peer p sent them; rows past `sum(recv_sizes)` are zero.
  max_rows_per_peer: a static bound on every send and receive size (the dense emulation's block).

It moves bytes only: `dispatch` and `combine` own the layout, the expansion and the gradients, so a
new transport is one module here plus one line in `_BACKENDS`.
"""

from __future__ import annotations

import jax

from jep.transport import reference, xla

# Fastest first: `auto` takes the first one that runs on the platform.
_BACKENDS = {"xla": xla, "reference": reference}


def current_platform() -> str:
    """The platform of the mesh being traced over ("cpu", "gpu", "tpu"), else the default."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def available(platform: str | None = None) -> tuple[str, ...]:
    """The transports that run on `platform` (default: the current one), fastest first."""
    platform = platform or current_platform()
    return tuple(name for name, m in _BACKENDS.items() if m.runs_on(platform))


def resolve(backend: str, platform: str | None = None) -> str:
    """The registered name `backend` stands for ("auto": the fastest that runs on `platform`)."""
    platform = platform or current_platform()
    if backend == "auto":
        return available(platform)[0]
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {names()}, got {backend!r}")
    if not _BACKENDS[backend].runs_on(platform):
        raise ValueError(
            f"transport backend={backend!r} does not run on {platform!r}: "
            f"{_BACKENDS[backend].UNAVAILABLE} Use backend='reference' or 'auto' there.")
    return backend


def get(name: str):
    """The `exchange` function of a registered transport."""
    return _BACKENDS[name].exchange
