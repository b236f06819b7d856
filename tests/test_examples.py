"""The training example runs end to end on 2 workers for every compressor and writes valid records."""
import json
from pathlib import Path

import pytest

from conftest import run_ranks

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
COMPRESSORS = ["none", "fp16", "qsgd", "nqsgd", "tuqsgd", "tnqsgd", "tbqsgd"]


@pytest.mark.multirank
@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_every_compressor_trains_and_records(tmp_path):
    run_ranks(2, ["examples/train_mnist.py", "--compressor", ",".join(COMPRESSORS), "--bits", "3",
                  "--steps", "6", "--eval-every", "3", "--test-size", "500", "--out-dir", str(tmp_path)])
    records = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(records) == sorted(f"{c}-s0.json" if c in ("none", "fp16") else f"{c}-b3-s0.json" for c in COMPRESSORS)
    for name, record in records.items():
        assert record["config"]["workers"] == 2 and record["config"]["steps"] == 6
        assert [e["step"] for e in record["evaluations"]] == [3, 6]
        assert 0.0 <= record["final_accuracy"] <= 1.0
        sent = record["bytes_per_step"]
        assert sent["fp32_reference"] == 4 * record["config"]["parameters"]
        if record["config"]["compressor"] == "none":
            assert sent["total"] == sent["fp32_reference"]
        elif record["config"]["compressor"] == "fp16":
            assert sent["total"] == sent["fp32_reference"] / 2
        else:  # 3 bits per coordinate plus headers and the small tensors sent in fp32
            assert sent["total"] < sent["fp32_reference"] / 8, (name, sent)
