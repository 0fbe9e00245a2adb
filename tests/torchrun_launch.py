"""Launch a worker script under `torchrun --nproc_per_node=2` (gloo on CPU) for the DDP tests."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args, timeout_s: int = 300, check: bool = True) -> str:
    """Run `script args...` in 2 processes (its folder and the repo on PYTHONPATH, 1 thread each); fails the
    test with the output's tail after timeout_s, or on a non-zero exit when `check`. Returns the output."""
    script = Path(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parent), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: torchrun passes it on to its workers (SIGKILL would orphan them)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"torchrun timed out after {timeout_s} s:\n{out[-3000:]}")
    assert proc.returncode == 0 or not check, out[-3000:]
    return out
