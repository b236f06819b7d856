"""The report generator on a small fixture of records."""
import json
import subprocess
import sys

from conftest import ROOT


def record(compressor, bits, seed, accuracies, total):
    return {"config": {"compressor": compressor, "bits": bits, "tail": "laplace" if compressor.startswith("t") else None,
                       "seed": seed, "workers": 8, "model": "cnn", "parameters": 1000, "data": "fashion-mnist",
                       "steps": 20, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32, "test_size": 100},
            "evaluations": [{"step": 10 * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)],
            "final_accuracy": accuracies[-1], "wall_seconds": 30.0,
            "bytes_per_step": {"sent": total, "received": total, "fp32_reference": 4000}}


def test_report_from_fixture(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    fixture = [record("none", None, 0, [0.5, 0.80], 4000), record("none", None, 1, [0.5, 0.82], 4000),
               record("qsgd", 2, 0, [0.4, 0.60], 400), record("qsgd", 2, 1, [0.4, 0.62], 400),
               record("tnqsgd", 2, 0, [0.5, 0.75], 420), record("tnqsgd", 2, 1, [0.5, 0.77], 420),
               record("nqsgd", 3, 0, [0.5, 0.70], 500), record("tuqsgd", 3, 0, [0.5, 0.69], 520)]
    for i, r in enumerate(fixture):
        (runs / f"{i}.json").write_text(json.dumps(r))
    out = tmp_path / "docs"
    subprocess.run([sys.executable, "examples/report.py", str(runs), "--out", str(out), "--command", "CMD"],
                   cwd=ROOT, check=True, capture_output=True)
    page = (out / "results.md").read_text()
    assert "| accuracy % at step 10 |" in page
    assert "| none | - | 32 | 2 | 50.00 ± 0.00 | 81.00 ± 1.41 | 4,000 | 1.000 |" in page
    assert "| qsgd | - | 2 | 2 | 40.00 ± 0.00 | 61.00 ± 1.41 | 400 | 0.100 |" in page
    assert "| tnqsgd | laplace | 2 | 2 | 50.00 ± 0.00 | 76.00 ± 1.41 | 420 | 0.105 |" in page
    assert "- 2 bits: held. Best truncated tnqsgd 76.00% vs best baseline qsgd 61.00%: +15.00 points" in page
    assert "- 3 bits: did not hold. Best truncated tuqsgd 69.00% vs best baseline nqsgd 70.00%: -1.00 points" in page
    assert "    CMD" in page
    for png in ("accuracy_vs_steps.png", "accuracy_vs_bits.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_feedback_report_from_fixture(tmp_path):
    """Rows without, with and with a decaying error feedback, in that order, with their spreads."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (compressor, bits, feedback, final) in enumerate([
            ("none", None, None, 0.85), ("tnqsgd", 1, False, 0.80), ("tnqsgd", 1, 0.5, 0.83),
            ("tnqsgd", 1, True, 0.60), ("tnqsgd", 1, True, 0.70)]):
        r = record(compressor, bits, i, [0.1, 0.2, 0.3, 0.4, final], 400)
        r["config"].update(exchange=None if compressor == "none" else "two-phase", error_feedback=feedback,
                           bucket_size=512)
        (runs / f"{i}.json").write_text(json.dumps(r))
    out = tmp_path / "docs"
    subprocess.run([sys.executable, "examples/feedback_report.py", str(runs), "--out", str(out), "--command", "CMD"],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| fp32", "| tnqsgd 1 bits", "| tnqsgd 1 bits + error feedback", "| tnqsgd 1 bits + error feedback ×0.5"]
    assert "| 2 | 40.00 ± 0.00 | 65.00 ± 7.07 | 400 | 0.100 |" in rows[2]
    assert (out / "accuracy_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def tta_record(kind, compressor, seed=0, label="none", qualities=(), times=(), workload="resnet", **method):
    return {"workload": workload, "frontend": "ddp", "compressor": compressor, "bits": method.get("bits"),
            "exchange": method.get("exchange"), "bucket_size": None, "bucket_bytes": None,
            "powersgd_rank": method.get("powersgd_rank"), "seed": seed, "label": label, "ranks": 8,
            "ranks_per_node": 4, "steps": 40, "warmup": 3, "parameters": 1000,
            "higher_is_better": workload == "resnet", "step_seconds_all": list(times),
            "evaluations": [{"step": 10 * (i + 1), "quality": q, "train_seconds": 1.0} for i, q in enumerate(qualities)],
            "received_per_rank": 2e6 if kind == "curve" else None,
            "nodes": [{"sent": 3e6, "received": 4e6}, {"sent": 3e6, "received": 4e6}]}


def test_tta_report_composes_steps_to_target_and_step_time(tmp_path):
    """Time to target = the first evaluation at or past the target x the median step time after the
    warm-up on the link; a configuration that never reaches it says so, and its time is a lower bound."""
    runs = tmp_path / "runs"
    runs.mkdir()
    tnqsgd = {"bits": 3, "exchange": "node-aware"}
    fixture = {
        "curve-fp32": tta_record("curve", "none", qualities=[0.5, 0.84, 0.86, 0.85]),
        "curve-fp16": tta_record("curve", "fp16", qualities=[0.5, 0.7, 0.80, 0.83]),
        "curve-tnqsgd": tta_record("curve", "tnqsgd", qualities=[0.5, 0.7, 0.845, 0.85], **tnqsgd),
        # warm-up steps (9 s) are dropped: medians 4.0, 2.0 and 1.0 s
        "time-fp32": tta_record("time", "none", label="100mbit", times=[9, 9, 9, 4, 4, 5, 3]),
        "time-fp16": tta_record("time", "fp16", label="100mbit", times=[9, 9, 9, 2, 2, 2]),
        "time-tnqsgd": tta_record("time", "tnqsgd", label="100mbit", times=[9, 9, 9, 1, 1.5, 0.5], **tnqsgd),
    }
    for name, r in fixture.items():
        (runs / f"{name}.json").write_text(json.dumps(r))
    out = tmp_path / "docs"
    subprocess.run([sys.executable, "examples/tta_report.py", str(runs), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [line for line in (out / "tables.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    # fp16 missed: its time is at least its 40-step budget x 2.0 s, so ratios against it are bounds
    assert rows[1:] == [
        "| TNQSGD 3 bits, node-aware (DDP) | 1 | 1.00 | 30 | 30 | 2.67x | > 2.67x | - | 0.8500 | 2.00 | 4.0 |",
        "| fp32 (DDP) | 1 | 4.00 | 20 | 80 | 1.00x | > 1.00x | - | 0.8500 | 2.00 | 4.0 |",
        "| fp16 (DDP) | 1 | 2.00 | missed | > 80 | < 1.00x | - | - | 0.8300 | 2.00 | 4.0 |",
    ]
    assert (out / "tta_resnet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
