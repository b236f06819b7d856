"""The training example runs end to end on 2 workers for every compressor, learns, and writes valid
records."""
import json
from pathlib import Path

import pytest

import horovod_truncq as htq
from conftest import run_ranks

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
COMPRESSORS = ["none", "fp16", *htq.SCHEMES]


@pytest.mark.multirank
@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_every_compressor_trains_and_records(tmp_path):
    run_ranks(2, ["examples/train_mnist.py", "--compressor", "all", "--bits", "3", "--lr", "0.05",
                  "--steps", "30", "--eval-every", "15", "--test-size", "500", "--out-dir", str(tmp_path)])
    records = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(records) == sorted(f"{c}-s0.json" if c in ("none", "fp16") else f"{c}-b3-s0.json" for c in COMPRESSORS)
    for name, record in records.items():
        compressor = record["config"]["compressor"]
        assert record["config"]["workers"] == 2 and record["config"]["steps"] == 30
        assert [e["step"] for e in record["evaluations"]] == [15, 30]
        # 10 classes: chance is 0.1; fp32 reaches about 0.58 in 30 steps. QSGD and NQSGD with one norm
        # per chunk may diverge at this learning rate: no accuracy is promised for them.
        if compressor not in ("qsgd", "nqsgd"):
            assert record["final_accuracy"] > 0.4, (name, record["final_accuracy"])
        moved = record["bytes_per_step"]
        assert moved["fp32_reference"] == 4 * record["config"]["parameters"]  # 2 (W - 1) / W = 1 at W = 2
        assert moved["sent"] == moved["received"]
        if compressor == "none":
            assert moved["received"] == moved["fp32_reference"]
        elif compressor == "fp16":
            assert moved["received"] == moved["fp32_reference"] / 2
        else:  # 3 bits per coordinate plus headers and the small tensors sent in fp32
            assert moved["received"] < moved["fp32_reference"] / 8, (name, moved)


@pytest.mark.multirank
@pytest.mark.parametrize("compressor", ["tnqsgd", "powersgd"])
def test_time_to_accuracy_run_records_its_curve(tmp_path, compressor):
    """examples/tta.py under mpirun with DDP over Gloo: the language model trains, the record holds the
    evaluations with their training time, and the bytes after the warm-up."""
    out = tmp_path / "run.json"
    run_ranks(2, ["examples/tta.py", "--workload", "charlm", "--frontend", "ddp", "--compressor", compressor,
                  "--exchange", "two-phase", "--steps", "6", "--eval-every", "3", "--warmup", "3", "--out", str(out)], controller="mpirun")
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["steps"] == 6 and len(record["step_seconds_all"]) == 6
    assert [e["step"] for e in record["evaluations"]] == [3, 6]
    first, last = record["evaluations"]
    assert 0 < first["train_seconds"] < last["train_seconds"] == pytest.approx(sum(record["step_seconds_all"]))
    # bytes: uniform guessing costs ln 256 = 5.55 nats per byte; six steps of Adam already do better
    assert last["quality"] < first["quality"] < 5.6
    if compressor == "tnqsgd":  # two-phase at W = 2: 3/8 byte per element, plus headers and small tensors
        assert 0.375 * record["parameters"] < record["received_per_rank"] < 0.45 * record["parameters"]
    else:
        assert record["received_per_rank"] is None and record["powersgd_rank"] == 4
