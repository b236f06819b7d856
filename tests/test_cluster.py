"""The emulated two-node cluster (launch/cluster.sh) in its short form: namespaces, shaped links,
mpirun across them, a record per run, the report, and a clean teardown."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT


def namespaces_allowed() -> bool:
    """Root, iproute2 and Open MPI are there, and this machine lets us create a network namespace."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "tc", "mpirun")):
        return False
    made = subprocess.run(["ip", "netns", "add", "truncq-probe"], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", "truncq-probe"], capture_output=True)
    return made


pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(not namespaces_allowed(), reason="needs root, iproute2 (ip, tc), Open MPI and network namespaces"),
]


def test_smoke_run_records_and_tears_down(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "runs"), REPORT=str(tmp_path / "docs"), HOROVOD_TRUNCQ_COMPILE="0")
    done = subprocess.run(["bash", "launch/cluster.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*.json"))]
    assert len(records) == 2  # fp32 and TNQSGD 3 bits at 100 Mbit/s
    for record in records:
        assert record["ranks"] == 4 and record["ranks_per_node"] == 2 and len(record["nodes"]) == 2
        assert record["label"] == "100mbit" and record["step_seconds"] > 0
        assert all(node["received"] > 0 for node in record["nodes"])
    shaped = {r["compressor"]: r for r in records}
    # what crossed the link: the quantized exchange moves far fewer bytes than fp32
    assert shaped["tnqsgd"]["nodes"][0]["received"] < shaped["none"]["nodes"][0]["received"] / 4
    assert (tmp_path / "docs" / "cluster_tables.md").exists()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "hn1" not in namespaces and "hn2" not in namespaces
    assert "hvbr0" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
