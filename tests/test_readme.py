"""The README's code runs as written."""

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_python_snippets_run():
    if len(jax.devices()) < 8:
        pytest.skip("the README's mesh is (2, 4)")
    # Each ```python block of the README, in order, in one namespace (8 simulated devices here).
    text = (ROOT / "README.md").read_text()
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert "aux" in namespace
