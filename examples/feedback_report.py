"""The error-feedback experiment's page: final accuracy with and without error feedback, curves, bytes.

    .venv/bin/python examples/feedback_report.py runs/feedback --out docs/feedback --command "bash launch/feedback.sh"

Reads the records of examples/train_mnist.py (runs with --error-feedback off,on,0.5) and writes
OUT/results.md and OUT/accuracy_vs_steps.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from report import COLORS, ORDER, curves, summary  # noqa: E402

Key = tuple[str, object, float]  # compressor, bits (None for fp32), share of the residual kept (0: off)
STYLES = {0.0: "-", 1.0: ":"}  # any other share: dash-dot


def load(folder: Path) -> dict[Key, list[dict]]:
    groups: dict[Key, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        config = record["config"]
        groups[(config["compressor"], config["bits"], float(config.get("error_feedback") or 0))].append(record)
    if not groups:
        raise SystemExit(f"no records in {folder}")
    return groups


def sort_key(key: Key) -> tuple:
    """By bits, scheme, then without, with and with a decaying error feedback."""
    return key[1] or 0, ORDER.index(key[0]), key[2] != 0, key[2] != 1


def label(key: Key) -> str:
    if key[1] is None:
        return "fp32"
    feedback = "" if not key[2] else " + error feedback" if key[2] == 1 else f" + error feedback ×{key[2]:g}"
    return f"{key[0]} {key[1]} bits{feedback}"


def table(groups: dict[Key, list[dict]]) -> list[str]:
    early = groups[next(iter(groups))][0]["evaluations"][3]["step"]
    lines = [f"| configuration | seeds | accuracy % at step {early} | final accuracy % (mean ± std) | "
             f"bytes received/step/worker | vs fp32 |", "|---|---|---|---|---|---|"]
    for key in sorted(groups, key=sort_key):
        records = groups[key]
        (mean, std), (early_mean, early_std) = summary(records), summary(records, 3)
        received = statistics.mean(r["bytes_per_step"]["received"] for r in records)
        reference = records[0]["bytes_per_step"]["fp32_reference"]
        lines.append(f"| {label(key)} | {len(records)} | {early_mean:.2f} ± {early_std:.2f} | {mean:.2f} ± {std:.2f} | "
                     f"{received:,.0f} | {received / reference:.3f} |")
    return lines


def plot(groups: dict[Key, list[dict]], path: Path) -> None:
    bit_widths = sorted({key[1] for key in groups if key[1] is not None})
    fig, axes = plt.subplots(1, len(bit_widths), figsize=(6 * len(bit_widths), 4.5), sharey=True, squeeze=False)
    lines = curves(groups)
    for axis, bits in zip(axes[0], bit_widths):
        for key in sorted(groups, key=sort_key):
            if key[1] not in (bits, None):
                continue
            steps, means = lines[key]
            style = "--" if key[1] is None else STYLES.get(key[2], "-.")
            axis.plot(steps, means, style, marker="o", markersize=2, color=COLORS[key[0]], label=label(key))
        axis.set_title(f"{bits} bits per coordinate (dotted: error feedback, dash-dot: decaying)")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("test accuracy % (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/feedback"))
    parser.add_argument("--command", default="bash launch/feedback.sh")
    args = parser.parse_args()
    groups = load(args.records)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(groups, args.out / "accuracy_vs_steps.png")
    config = next(r for records in groups.values() for r in records if r["config"]["exchange"])["config"]
    minutes = sum(r["wall_seconds"] for records in groups.values() for r in records) / 60
    page = [
        "# Error feedback at 1 and 2 bits, 8 workers",
        "",
        f"{config['workers']} Horovod workers (Gloo) train the example {config['model'].upper()} on {config['data']} "
        f"for {config['steps']} steps (SGD, learning rate {config['lr']}, momentum {config['momentum']}, batch "
        f"{config['batch_size']} per worker), exchange {config['exchange']}; QSGD with {config['bucket_size']}-element "
        f"buckets. Final accuracy on the whole test set; the curves use the first {config['test_size']} test images. "
        f"Training time of all runs: {minutes:.0f} minutes.",
        "",
        "Produced by:",
        "",
        f"    {args.command}",
        "",
        *table(groups),
        "",
        "![test accuracy against steps](accuracy_vs_steps.png)",
        "",
    ]
    (args.out / "results.md").write_text("\n".join(page))
    print(f"wrote {args.out / 'results.md'} from {sum(len(v) for v in groups.values())} records")


if __name__ == "__main__":
    main()
