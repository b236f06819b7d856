"""Tables and a plot from launch/cluster.sh's records: step time against link rate and ranks.

    .venv/bin/python examples/cluster_report.py runs/cluster --out docs --command "bash launch/cluster.sh"

Writes OUT/cluster_tables.md (one table per link rate: every configuration, also those that lose) and
OUT/cluster_step_time.png. Repeated runs of a configuration are summarised by their median.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RATE_ORDER = ["100mbit", "1gbit", "none"]
RATE_NAMES = {"100mbit": "100 Mbit/s", "1gbit": "1 Gbit/s", "none": "unshaped"}


def config_name(record: dict) -> str:
    frontend = {"horovod": "Horovod", "ddp": "DDP"}[record.get("frontend", "horovod")]
    if record["compressor"] in ("none", "fp16", "bf16"):
        return f"{record['compressor'].replace('none', 'fp32')} ({frontend})"
    if record["compressor"] == "powersgd":
        return f"PowerSGD rank {record['powersgd_rank']} ({frontend})"
    bucket = f", buckets {record['bucket_bytes'] / 2 ** 20:g} MiB" if record.get("bucket_bytes") else ""
    if record.get("bucket_size"):
        bucket += f", scale per {record['bucket_size']}"
    return f"{record['compressor'].upper()} {record['bits']} bits, {record['exchange']}{bucket} ({frontend})"


def load(folder: Path) -> dict[tuple[str, int, str], list[dict]]:
    groups: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        groups[(record["label"], record["ranks"], config_name(record))].append(record)
    return groups


def two_phase_bytes_per_element(ranks: int, bits: int) -> float:
    return 2 * (ranks - 1) / ranks * bits / 8


def tables(groups) -> list[str]:
    lines = []
    rates = sorted({key[0] for key in groups}, key=lambda r: RATE_ORDER.index(r) if r in RATE_ORDER else 99)
    for rate in rates:
        lines += [f"### {RATE_NAMES.get(rate, rate)}", "",
                  "| ranks | configuration | runs | step s | vs fp32 | vs fp16 | vs PowerSGD r4 | forward+backward s | "
                  "received MB/rank/step | received bytes/element | two-phase formula | node rx MB/step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for ranks in sorted({key[1] for key in groups if key[0] == rate}):
            keys = [key for key in groups if key[:2] == (rate, ranks)]
            step = {key[2]: statistics.median(r["step_seconds"] for r in groups[key]) for key in keys}
            for key in sorted(keys, key=lambda k: step[k[2]], reverse=True):
                records = groups[key]
                first = records[0]
                counted = [r["received_per_rank"] for r in records if r["received_per_rank"] is not None]
                received = statistics.median(counted) if counted else None
                per_element = f"{received / first['parameters']:.3f}" if counted else "-"
                formula = "-"
                if first.get("exchange") == "two-phase":
                    formula = f"{two_phase_bytes_per_element(ranks, first['bits']):.3f}"
                node_rx = statistics.median(statistics.mean(n["received"] for n in r["nodes"]) for r in records) / 1e6
                ratio = lambda base: f"{step[base] / step[key[2]]:.2f}x" if base in step else "-"  # noqa: E731
                base = "DDP" if "(DDP)" in key[2] else "Horovod"
                lines.append(f"| {ranks} | {key[2]} | {len(records)} | {step[key[2]]:.2f} | {ratio(f'fp32 ({base})')} | "
                             f"{ratio(f'fp16 ({base})')} | {ratio('PowerSGD rank 4 (DDP)')} | "
                             f"{statistics.median(r['compute_seconds'] for r in records):.2f} | "
                             f"{'-' if received is None else f'{received / 1e6:.2f}'} | "
                             f"{per_element} | {formula} | {node_rx:.1f} |")
        lines.append("")
    return lines


def plot(groups, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rank_counts = sorted({key[1] for key in groups})
    rates = [r for r in RATE_ORDER if any(key[0] == r for key in groups)]
    fig, axes = plt.subplots(1, len(rank_counts), figsize=(6 * len(rank_counts), 4.5), squeeze=False)
    for axis, ranks in zip(axes[0], rank_counts):
        for name in sorted({key[2] for key in groups if key[1] == ranks}):
            xs, ys = [], []
            for i, rate in enumerate(rates):
                if (rate, ranks, name) in groups:
                    xs.append(i)
                    ys.append(statistics.median(r["step_seconds"] for r in groups[(rate, ranks, name)]))
            axis.plot(xs, ys, marker="o", label=name)
        axis.set_xticks(range(len(rates)), [RATE_NAMES[r] for r in rates])
        axis.set_yscale("log")
        axis.set_ylabel("seconds per step (median)")
        axis.set_title(f"ResNet-18, {ranks} ranks on 2 emulated nodes")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--command", default="bash launch/cluster.sh")
    args = parser.parse_args()
    groups = load(args.records)
    if not groups:
        raise SystemExit(f"no records in {args.records}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(groups, args.out / "cluster_step_time.png")
    page = ["# Step time on the emulated cluster: generated tables", "", "Produced by:", "",
            f"    {args.command}", f"    .venv/bin/python examples/cluster_report.py {args.records} --out {args.out}", "",
            *tables(groups), "![step time against link rate](cluster_step_time.png)", ""]
    (args.out / "cluster_tables.md").write_text("\n".join(page))
    print("\n".join(tables(groups)))


if __name__ == "__main__":
    main()
