"""Helpers to launch real multi-process Horovod jobs from tests."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The suite runs the codec eagerly (compiling every bit width and scheme would dominate its time);
# tests/test_kernels.py checks that the compiled passes compute the same bits.
os.environ.setdefault("HOROVOD_TRUNCQ_COMPILE", "0")


def horovod_env(**extra: str) -> dict[str, str]:
    # OMPI_MCA_rtc_hwloc_vmhole: see launch/cluster.sh (an intermittent segfault of Open MPI 4.1's launcher)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMPI_MCA_rtc_hwloc_vmhole="none")
    env.update(extra)
    return env


def run_ranks(np: int, args: list[str], controller: str = "gloo", timeout: int = 300, **env: str) -> str:
    """Run `python args...` on `np` local ranks; return the output, fail the test on a non-zero exit."""
    if controller == "mpirun":
        if shutil.which("mpirun") is None:
            pytest.skip("mpirun not installed")
        cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(np), sys.executable, *args]
    else:
        cmd = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}"]
        if controller == "mpi":
            if shutil.which("mpirun") is None:
                pytest.skip("mpirun not installed")
            cmd += ["--mpi-args=--oversubscribe --allow-run-as-root"]
        cmd += [sys.executable, *args]
    return run_command(cmd, timeout, **env)


def run_command(cmd: list[str], timeout: int = 300, **env: str) -> str:
    """Run `cmd` from the repository root; return its output, fail the test on a non-zero exit or a hang."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=horovod_env(**env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s (hang?)\n{error.stdout}\n{error.stderr}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}\n{output[-6000:]}"
    return output


def assert_ok(output: str, check: str, np: int) -> None:
    """Every rank printed "OK <check> <rank>" (launchers may interleave the lines)."""
    ranks = set(re.findall(rf"OK {re.escape(check)} (\d+)", output))
    assert ranks == {str(r) for r in range(np)}, f"'{check}' passed on ranks {sorted(ranks)} of {np}\n{output[-4000:]}"
