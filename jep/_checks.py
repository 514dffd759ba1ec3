"""Trace-time argument checks: chex's static assertions, raising the ValueError/TypeError that
callers expect, with a message naming the offending argument (chex's own in the cause)."""

from __future__ import annotations

import chex
import jax.numpy as jnp


def rank(x, expected: int, name: str) -> None:
    try:
        chex.assert_rank(x, expected)
    except AssertionError as error:
        raise ValueError(f"{name} must have rank {expected}, got shape {jnp.shape(x)}") from error


def shape(x, expected: tuple, name: str) -> None:
    try:
        chex.assert_shape(x, tuple(expected))
    except AssertionError as error:
        raise ValueError(f"{name} must have shape {tuple(expected)}, "
                         f"got {tuple(jnp.shape(x))}") from error


def floating(x, name: str) -> None:
    try:
        chex.assert_type(x, float)
    except AssertionError as error:
        raise TypeError(f"{name} must be a floating-point array, "
                        f"got dtype {jnp.result_type(x)}") from error


def integer(x, name: str) -> None:
    try:
        chex.assert_type(x, int)
    except AssertionError as error:
        raise TypeError(f"{name} must be an integer array, "
                        f"got dtype {jnp.result_type(x)}") from error
