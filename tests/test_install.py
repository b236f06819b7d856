"""The set-up produced a working Horovod with PyTorch and Gloo, and our package imports."""
import subprocess

import horovod.torch as hvd

import horovod_truncq as htq
from conftest import BIN, assert_ok, run_ranks


def test_package_imports():
    assert htq.__version__
    assert callable(htq.DistributedOptimizer)


def test_horovod_has_pytorch_and_gloo():
    assert hvd.gloo_built()
    report = subprocess.run([str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True, check=True).stdout
    assert "[X] PyTorch" in report and "[X] Gloo" in report


def test_two_rank_allgather_of_uint8():
    output = run_ranks(2, ["tests/workers/allgather_worker.py"])
    assert_ok(output, "allgather", 2)
