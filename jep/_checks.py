"""Trace-time argument checks that name the offending argument (chex-style, but raising
ValueError/TypeError as callers expect)."""

from __future__ import annotations

import jax.numpy as jnp


def rank(x, expected: int, name: str) -> None:
    if jnp.ndim(x) != expected:
        raise ValueError(f"{name} must have rank {expected}, got shape {jnp.shape(x)}")


def shape(x, expected: tuple, name: str) -> None:
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(jnp.shape(x))}")


def floating(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def integer(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}")
