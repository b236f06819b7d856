"""Turn training records (examples/train_mnist.py) into a results page with a table and plots.

    .venv/bin/python examples/report.py runs/sweep --out docs --command "bash launch/sweep.sh"

Writes OUT/results.md, OUT/accuracy_vs_steps.png and OUT/accuracy_vs_bits.png.
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

import horovod_truncq as htq  # noqa: E402

TRUNCATED = tuple(name for name, cls in htq.SCHEMES.items() if cls.truncated)
BASELINES = tuple(name for name, cls in htq.SCHEMES.items() if not cls.truncated)
ORDER = ("none", "fp16") + BASELINES + TRUNCATED
COLORS = dict(zip(ORDER, ("black", "gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))


def load(folder: Path) -> dict[tuple[str, object], list[dict]]:
    groups: dict[tuple[str, object], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        groups[(record["config"]["compressor"], record["config"]["bits"])].append(record)
    if not groups:
        raise SystemExit(f"no records in {folder}")
    return groups


def summary(records: list[dict], evaluation: int = -1) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one run) of one evaluation's accuracy (default:
    the final one), in percent."""
    values = [100 * r["evaluations"][evaluation]["accuracy"] for r in records]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sort_key(key: tuple[str, object]) -> tuple[int, int]:
    return ORDER.index(key[0]), key[1] or 0


def table(groups) -> list[str]:
    first = next(iter(groups.values()))[0]["evaluations"][0]["step"]
    lines = [f"| compressor | tail | bits/coord | seeds | accuracy % at step {first} | final test accuracy % "
             f"(mean ± std) | bytes received/step/worker | vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=sort_key):
        records = groups[key]
        mean, std = summary(records)
        early, early_std = summary(records, 0)
        received = statistics.mean(r["bytes_per_step"]["received"] for r in records)
        reference = records[0]["bytes_per_step"]["fp32_reference"]
        bits = {"none": 32, "fp16": 16}.get(key[0], key[1])
        lines.append(f"| {key[0]} | {records[0]['config'].get('tail') or '-'} | {bits} | {len(records)} | "
                     f"{early:.2f} ± {early_std:.2f} | {mean:.2f} ± {std:.2f} | {received:,.0f} | {received / reference:.3f} |")
    return lines


def verdicts(groups) -> list[str]:
    """Per bit width: the best truncated scheme against the best baseline, with the seeds' spread."""
    lines = []
    for bits in sorted({b for (_, b) in groups if b is not None}):
        def best(names):
            found = [(summary(groups[(n, bits)]), n) for n in names if (n, bits) in groups]
            return max(found) if found else None
        truncated, baseline = best(TRUNCATED), best(BASELINES)
        if not truncated or not baseline:
            continue
        (t_mean, t_std), t_name = truncated
        (b_mean, b_std), b_name = baseline
        gap, spread = t_mean - b_mean, max(t_std, b_std)
        if gap > 2 * spread and gap > 0:
            word = "held"
        elif gap > 0:
            word = "held, within twice the seeds' spread"
        else:
            word = "did not hold"
        lines.append(f"- {bits} bits: {word}. Best truncated {t_name} {t_mean:.2f}% vs best baseline {b_name} "
                     f"{b_mean:.2f}%: {gap:+.2f} points (largest std over seeds {spread:.2f}).")
    return lines


def curves(groups) -> dict[tuple[str, object], tuple[list[int], list[float]]]:
    """Mean accuracy over seeds at each evaluated step."""
    out = {}
    for key, records in groups.items():
        steps = [e["step"] for e in records[0]["evaluations"]]
        means = [statistics.mean(100 * r["evaluations"][i]["accuracy"] for r in records) for i in range(len(steps))]
        out[key] = (steps, means)
    return out


def plot_steps(groups, path: Path) -> None:
    bit_widths = sorted({b for (_, b) in groups if b is not None})
    fig, axes = plt.subplots(1, len(bit_widths), figsize=(5 * len(bit_widths), 4), sharey=True, squeeze=False)
    lines = curves(groups)
    for ax, bits in zip(axes[0], bit_widths):
        for key in sorted(lines, key=sort_key):
            if key[1] in (bits, None):
                steps, means = lines[key]
                ax.plot(steps, means, "--" if key[1] is None else "-", marker="o", markersize=3, label=key[0],
                        color=COLORS[key[0]])
        ax.set_title(f"{bits} bits per coordinate")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy % (mean over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bits(groups, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ORDER:
        points = sorted((k[1], summary(v)) for k, v in groups.items() if k[0] == name and k[1] is not None)
        if points:
            ax.errorbar([b for b, _ in points], [m for _, (m, _) in points], yerr=[s for _, (_, s) in points],
                        marker="o", capsize=3, label=name, color=COLORS[name])
        elif (name, None) in groups:
            ax.axhline(summary(groups[(name, None)])[0], linestyle="--", color=COLORS[name], linewidth=1,
                       label=f"{name} ({'32' if name == 'none' else '16'} bits)")
    ax.set_xlabel("bits per coordinate")
    ax.set_xticks(sorted({k[1] for k in groups if k[1] is not None}))
    ax.set_ylabel("final test accuracy % (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--command", default="bash launch/sweep.sh", help="the command that produced the records")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended as the discussion")
    args = parser.parse_args()
    groups = load(args.records)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_steps(groups, args.out / "accuracy_vs_steps.png")
    plot_bits(groups, args.out / "accuracy_vs_bits.png")
    config = next(iter(groups.values()))[0]["config"]
    seconds = sum(r["wall_seconds"] for rs in groups.values() for r in rs)
    page = [
        "# Results: truncated quantization against QSGD and NQSGD, 8 workers",
        "",
        f"{config['workers']} Horovod workers (Gloo, one machine) train the example {config['model'].upper()} "
        f"({config['parameters']:,} parameters) on {config['data']} for {config['steps']} steps: SGD, learning rate "
        f"{config['lr']}, momentum {config['momentum']}, weight decay {config['weight_decay']}, batch "
        f"{config['batch_size']} per worker, each worker on its own shard. The final accuracy is on the whole "
        f"test set (10,000 images); the intermediate evaluations (the curves, and the first-evaluation column) "
        f"use the first {config['test_size']}. "
        f"Bytes per step are what one worker receives from the network in all collectives (payloads, 4-byte "
        f"placeholders and the tensors under 1024 elements sent in fp32; a worker sends as much), next to "
        f"Horovod's fp32 ring allreduce, 2·4·(W-1)/W bytes per element. "
        f"Training time of all runs together: {seconds / 60:.0f} minutes.",
        "",
        "Produced by:",
        "",
        f"    {args.command}",
        f"    .venv/bin/python examples/report.py {args.records} --out {args.out}",
        "",
        "## Final accuracy",
        "",
        *table(groups),
        "",
        "## Did the papers' claim hold? (truncated beats QSGD and NQSGD at the same bits)",
        "",
        *verdicts(groups),
        "",
        "![test accuracy against steps](accuracy_vs_steps.png)",
        "",
        "![final accuracy against bits](accuracy_vs_bits.png)",
        "",
    ]
    if args.notes and args.notes.exists():
        page += [args.notes.read_text().strip(), ""]
    (args.out / "results.md").write_text("\n".join(page))
    print(f"wrote {args.out / 'results.md'} from {sum(len(v) for v in groups.values())} records")


if __name__ == "__main__":
    main()
