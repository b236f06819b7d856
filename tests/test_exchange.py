"""The Horovod front end through real Horovod: horovodrun with Gloo and MPI, and mpirun + mpi4py."""
import pytest

from conftest import assert_ok, run_ranks

WORKER = "tests/workers/exchange_worker.py"
pytestmark = pytest.mark.multirank


def test_two_ranks_gloo():
    checks = ["oneliner", "none", "bytes", "features", "sparse", "mismatch", "join"]
    output = run_ranks(2, [WORKER, *checks])
    for check in checks:
        assert_ok(output, check, 2)


def test_four_ranks_mpi():
    checks = ["average", "resume", "bytes", "join"]
    output = run_ranks(4, [WORKER, *checks], controller="mpi", timeout=600)
    for check in checks:
        assert_ok(output, check, 4)


def test_mpi4py_communicator():
    output = run_ranks(2, [WORKER, "mpi4py", "average"], controller="mpirun")
    assert_ok(output, "average", 2)
