"""The quantized exchange through real Horovod: horovodrun with Gloo and MPI, and mpirun + mpi4py."""
import pytest

from conftest import assert_ok, run_ranks

WORKER = "tests/workers/exchange_worker.py"
pytestmark = pytest.mark.multirank


def test_two_ranks_gloo():
    checks = ["exact", "none", "stock", "oneliner", "bytes", "features", "order", "train", "flush"]
    output = run_ranks(2, [WORKER, *checks])
    for check in checks:
        assert_ok(output, check, 2)


def test_two_ranks_mpi():
    output = run_ranks(2, [WORKER, "exact-short", "bytes"], controller="mpi")
    assert_ok(output, "exact", 2)
    assert_ok(output, "bytes", 2)


def test_mpi4py_communicator():
    output = run_ranks(2, [WORKER, "mpi4py", "exact-short"], controller="mpirun")
    assert_ok(output, "exact", 2)


def test_eight_ranks_gloo():
    output = run_ranks(8, [WORKER, "exact-short", "process_set", "bytes"], timeout=600,
                       HOROVOD_DYNAMIC_PROCESS_SETS="1")
    for check in ("exact", "process_set", "bytes"):
        assert_ok(output, check, 8)


def test_sparse_gradients_raise_on_every_rank():
    output = run_ranks(2, [WORKER, "sparse"], timeout=120)
    assert_ok(output, "sparse", 2)


def test_gradient_of_an_unbound_parameter_raises_on_every_rank():
    output = run_ranks(2, [WORKER, "stray"], timeout=120)
    assert_ok(output, "stray", 2)


def test_mismatched_settings_raise_on_every_rank():
    output = run_ranks(2, [WORKER, "mismatch"], timeout=180)
    assert_ok(output, "mismatch", 2)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_phase_four_ranks(controller):
    checks = ["two-phase", "node-aware", "node-aware-found", "flush", "bytes", "mismatch"]
    output = run_ranks(4, [WORKER, *checks], controller=controller, timeout=600)
    for check in checks:
        assert_ok(output, check, 4)


def test_error_feedback_four_ranks():
    output = run_ranks(4, [WORKER, "feedback", "resume"], timeout=600)
    assert_ok(output, "feedback", 4)
    assert_ok(output, "resume", 4)
