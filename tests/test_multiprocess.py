"""jep across processes: two processes of 4 CPU devices each, joined by jax.distributed on
localhost (gloo), compute what one process of 8 devices computes (tests/multiprocess_worker.py)."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import make_mesh

import multiprocess_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU processes on localhost")
def test_two_processes_compute_what_one_process_computes(tmp_path):
    out = tmp_path / "two_processes.npz"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), "--process-id", str(i),
         "--num-processes", "2", "--port", str(port), "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the two processes did not finish within {TIMEOUT_S} s")
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    got = dict(np.load(out))

    want = worker.compute(make_mesh((2, 4), worker.AXES))
    assert set(got) == set(want)
    # Across processes the node hop takes XLA's collectives (the dense reference exchange on the
    # CPU) and the local hop, inside each process, the ffi transport; in one process both ffi.
    assert list(got.pop("transports")) == ["reference", "ffi"]
    assert list(want.pop("transports")) == ["ffi", "ffi"]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # Hierarchical and flat agree across processes too.
    for name in ("out", "dx", "dweights"):
        np.testing.assert_allclose(got[f"hierarchical/{name}"], got[f"flat/{name}"],
                                   rtol=1e-5, atol=1e-5)
