"""Builds the ragged all-to-all handlers on first use, with the compiler on this machine.

The shared library for a platform ("cpu": g++, "gpu": nvcc) is compiled against
`jax.ffi.include_dir()` and cached under `$JEP_KERNELS_CACHE` (default `~/.cache/jep_kernels`)
in a folder named by the platform and a hash of the jax/jaxlib versions, the flags and the
sources, so a new jax or an edited source builds afresh and concurrent first uses (pytest -n)
do not collide.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jaxlib

HERE = pathlib.Path(__file__).resolve().parent
HEADERS = ("buffers.h", "buffer_sets.h", "routes.h", "rendezvous.h", "low_latency.h")
SOURCES = {"cpu": "cpu.cc", "gpu": "cuda.cu"}
COMPILERS = {"cpu": "g++", "gpu": "nvcc"}
LIBRARY = "libjep_ragged_a2a.so"


class CompilerNotFound(RuntimeError):
    """The compiler the handler needs is not on PATH."""


def compiler(platform: str) -> str | None:
    """The path of the compiler for `platform`, or None."""
    return shutil.which(COMPILERS[platform])


def gpu_arch() -> str:
    """`sm_XY` of the first GPU (all GPUs of a process are taken to be alike)."""
    capability = getattr(jax.devices("gpu")[0], "compute_capability", "9.0")
    major, minor = str(capability).split(".")[:2]
    return f"sm_{major}{minor}"


def command(platform: str, source: pathlib.Path, output: pathlib.Path) -> list[str]:
    includes = [f"-I{jax.ffi.include_dir()}", f"-I{HERE}"]
    if platform == "cpu":
        return [compiler("cpu"), "-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off",
                *includes, str(source), "-o", str(output)]
    arch = gpu_arch()
    return [compiler("gpu"), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
            "-fmad=false", f"-gencode=arch=compute_{arch[3:]},code={arch}", *includes,
            str(source), "-o", str(output)]


def _key(platform: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{jax.__version__} {jaxlib.__version__} {platform}".encode())
    digest.update(" ".join(command(platform, pathlib.Path("src"), pathlib.Path("out"))).encode())
    for name in (SOURCES[platform], *HEADERS):
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> pathlib.Path:
    root = os.environ.get("JEP_KERNELS_CACHE") or pathlib.Path.home() / ".cache" / "jep_kernels"
    return pathlib.Path(root) / "ragged_a2a"


def library(platform: str) -> pathlib.Path:
    """The path of the built library for `platform`, building it if it is not cached."""
    if platform not in SOURCES:
        raise ValueError(f"platform must be one of {tuple(SOURCES)}, got {platform!r}")
    if compiler(platform) is None:
        raise CompilerNotFound(
            f"the ffi transport builds its {platform} handler with {COMPILERS[platform]}, which is "
            f"not on PATH. Install it, or use backend='reference' (any platform) or 'xla' (GPU).")
    target = cache_dir() / f"{platform}-{_key(platform)}" / LIBRARY
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        output = pathlib.Path(scratch) / LIBRARY
        done = subprocess.run(command(platform, HERE / SOURCES[platform], output),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"building the ffi transport's {platform} handler failed:\n"
                f"{' '.join(done.args)}\n{done.stderr[-4000:]}")
        os.replace(output, target)  # atomic: a concurrent build of the same key is identical
    return target
