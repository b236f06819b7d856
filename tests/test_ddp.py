"""The DDP comm hook through torch's own launcher (torchrun, Gloo, 4 ranks on this machine)."""
import pytest

from conftest import BIN, assert_ok, run_command

pytestmark = pytest.mark.multirank


def test_ddp_hook_four_ranks():
    checks = ["replicas", "close", "inprocess", "rebuild", "mismatch", "resume", "unused", "failure"]
    output = run_command([str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_port", "29541",
                          "tests/workers/ddp_worker.py", *checks], timeout=300)
    for check in checks:
        assert_ok(output, check, 4)


def test_importing_the_hook_needs_no_horovod():
    output = run_command([str(BIN / "python"), "-c",
                          "import sys, horovod_truncq as htq; htq.ddp.State; "
                          "assert not any(m.startswith('horovod.') or m == 'horovod' for m in sys.modules); print('OK no-horovod 0')"])
    assert_ok(output, "no-horovod", 1)
