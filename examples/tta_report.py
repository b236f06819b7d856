"""Time to accuracy from launch/tta.sh's records: one table per workload and link rate, and plots.

    .venv/bin/python examples/tta_report.py docs/tta/records --out docs/tta

A configuration's time to target on a link = the steps its unshaped run needed to reach the target
(first evaluation at or past it) x its median step time on that link (the "time" runs, after their
warm-up steps). Targets, fixed before the other configurations ran: ResNet-18 84% test accuracy on
5,000 test images (a first fp32 run ended its 300 steps at 85.2%); the language model 1.05 x fp32's
(DDP) final validation loss of the same seed. Writes
OUT/tables.md and OUT/tta_<workload>.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

from cluster_report import RATE_NAMES, RATE_ORDER, config_name

RESNET_TARGET = 0.84
CHARLM_TARGET_OVER_FP32 = 1.05
TITLES = {"resnet": "ResNet-18 on Fashion-MNIST (test accuracy)", "charlm": "Character-level transformer on "
          "the Python standard library (validation loss, nats per byte)"}
FP32, FP16, POWERSGD = "fp32 (DDP)", "fp16 (DDP)", "PowerSGD rank 4 (DDP)"


def load(folder: Path):
    curves, times, checks = defaultdict(list), defaultdict(list), {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        key = (record["workload"], record["ranks"], config_name(record))
        if path.name.startswith("curve-"):
            curves[key].append(record)
        elif path.name.startswith("time-"):
            times[(record["label"], *key)].append(record)
        elif path.name.startswith("check-"):
            checks[(record["label"], *key)] = record
    return curves, times, checks


def step_seconds(records: list[dict]) -> float:
    """Median step time after the run's warm-up steps (compilation; PowerSGD's fp32 steps)."""
    return statistics.median(t for r in records for t in r["step_seconds_all"][r["warmup"]:])


def target(workload: str, ranks: int, seed: int, curves) -> Optional[float]:
    if workload == "resnet":
        return RESNET_TARGET
    fp32 = [r for r in curves.get((workload, ranks, FP32), []) if r["seed"] == seed]
    return CHARLM_TARGET_OVER_FP32 * fp32[0]["evaluations"][-1]["quality"] if fp32 else None


def steps_to_target(record: dict, goal: Optional[float]) -> Optional[int]:
    if goal is None:
        return None
    better = (lambda q: q >= goal) if record["higher_is_better"] else (lambda q: q <= goal)
    return next((e["step"] for e in record["evaluations"] if better(e["quality"])), None)


def summary(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def time_to_target(workload, ranks, name, rate, curves, times) -> Optional[tuple[float, bool]]:
    """(Median over seeds of steps to target x median step time on the link, whether a seed missed);
    a seed that missed counts at the step budget, so the time is then a lower bound. None: no time run."""
    if (rate, workload, ranks, name) not in times:
        return None
    records = curves[(workload, ranks, name)]
    steps = [steps_to_target(r, target(workload, ranks, r["seed"], curves)) for r in records]
    counted = [r["steps"] if s is None else s for r, s in zip(records, steps)]
    return statistics.median(counted) * step_seconds(times[(rate, workload, ranks, name)]), None in steps


def speedup(base: Optional[tuple[float, bool]], ours: Optional[tuple[float, bool]]) -> str:
    """base's time over ours; a bound ("> ", "< ") where one of them missed, "-" where both did."""
    if base is None or ours is None or (base[1] and ours[1]):
        return "-"
    bound = "> " if base[1] else "< " if ours[1] else ""
    return f"{bound}{base[0] / ours[0]:.2f}x"


def seconds(tt: Optional[tuple[float, bool]]) -> str:
    return "-" if tt is None else f"{'> ' if tt[1] else ''}{tt[0]:.0f}"


def tables(curves, times, checks) -> list[str]:
    lines = []
    for workload in [w for w in TITLES if any(k[0] == w for k in curves)]:
        for ranks in sorted({k[1] for k in curves if k[0] == workload}):
            rates = [r for r in RATE_ORDER if any(k[:3] == (r, workload, ranks) for k in times)]
            names = sorted((k[2] for k in curves if k[:2] == (workload, ranks)),
                           key=lambda n: (n.endswith("(Horovod)"), n))
            budget = curves[(workload, ranks, names[0])][0]["steps"]
            lines += [f"### {TITLES[workload]}, {ranks} ranks, {budget} steps", ""]
            for rate in rates:
                tt = {n: time_to_target(workload, ranks, n, rate, curves, times) for n in names}
                lines += [f"**{RATE_NAMES.get(rate, rate)}**", "",
                          "| configuration | seeds | step s | steps to target | time to target s | vs fp32 | vs fp16 | "
                          "vs PowerSGD r4 | final quality | received MB/rank/step (in-node too) | node rx MB/step |",
                          "|---|---|---|---|---|---|---|---|---|---|---|"]
                for n in sorted(names, key=lambda n: (2, 0.0) if tt[n] is None else (int(tt[n][1]), tt[n][0])):
                    records = curves[(workload, ranks, n)]
                    timed = times.get((rate, workload, ranks, n))
                    reached = [steps_to_target(r, target(workload, ranks, r["seed"], curves)) for r in records]
                    received = records[0]["received_per_rank"]
                    node_rx = statistics.mean(node["received"] for node in timed[0]["nodes"]) / 1e6 if timed else None
                    # the fp32 and fp16 columns compare within a front end; PowerSGD runs on DDP only
                    base = "DDP" if n.endswith("(DDP)") else "Horovod"
                    lines.append(
                        f"| {n} | {len(records)} | {step_seconds(timed):.2f} | "
                        f"{', '.join('missed' if s is None else str(s) for s in reached)} | "
                        f"{seconds(tt[n])} | {speedup(tt.get(f'fp32 ({base})'), tt[n])} | "
                        f"{speedup(tt.get(f'fp16 ({base})'), tt[n])} | {speedup(tt.get(POWERSGD), tt[n])} | "
                        f"{summary([r['evaluations'][-1]['quality'] for r in records], 4)} | "
                        f"{'-' if received is None else f'{received / 1e6:.2f}'} | "
                        f"{'-' if node_rx is None else f'{node_rx:.1f}'} |" if timed else f"| {n} | {len(records)} | "
                        f"not timed | | | | | | | | |")
                lines.append("")
            final = {n: statistics.mean(r["evaluations"][-1]["quality"] for r in curves[(workload, ranks, n)])
                     for n in names}
            if FP32 in final:
                lines += ["Final quality against fp32 (DDP), same steps: " + ", ".join(
                    f"{n} {final[n] / final[FP32]:.4f}" for n in names) + ".", ""]
    for (rate, workload, ranks, name), record in checks.items():
        measured = steps_to_target(record, target(workload, ranks, record["seed"], curves))
        composed = time_to_target(workload, ranks, name, rate, curves, times)
        reached = (record["evaluations"][[e["step"] for e in record["evaluations"]].index(measured)]["train_seconds"]
                   if measured else None)
        lines += [f"Check, {name}, {workload}, {ranks} ranks, {RATE_NAMES.get(rate, rate)}, trained end to end on the "
                  f"shaped link: target at step {measured} after {reached and f'{reached:.0f}'} s of training; "
                  f"composed from the unshaped curve and the short timed run: "
                  f"{seconds(composed)} s.", ""]
    return lines


def plot(workload: str, curves, times, path: Path) -> bool:
    """Quality against training time on each link timed; False (nothing drawn) where none was."""
    ranks = max(k[1] for k in curves if k[0] == workload)
    rates = [r for r in RATE_ORDER if any(k[:3] == (r, workload, ranks) for k in times)]
    if not rates:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.5), squeeze=False)
    for axis, rate in zip(axes[0], rates):
        for name in sorted(k[2] for k in curves if k[:2] == (workload, ranks)):
            if (rate, workload, ranks, name) not in times:
                continue
            seconds = step_seconds(times[(rate, workload, ranks, name)])
            record = curves[(workload, ranks, name)][0]
            axis.plot([e["step"] * seconds for e in record["evaluations"]],
                      [e["quality"] for e in record["evaluations"]], label=name,
                      linestyle="-" if name.endswith("(DDP)") else "--")
        goal = target(workload, ranks, 0, curves)
        if goal is not None:
            axis.axhline(goal, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap
        axis.set_xlabel("training seconds (evaluation excluded)")
        axis.set_ylabel("test accuracy" if workload == "resnet" else "validation loss")
        if workload == "resnet":
            axis.set_ylim(0.6, 0.95)
        axis.set_title(f"{RATE_NAMES.get(rate, rate)}, {ranks} ranks on 2 emulated nodes, seed 0", fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6)
    fig.suptitle(TITLES[workload], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="?", default=Path("docs/tta/records"))
    parser.add_argument("--out", type=Path, default=Path("docs/tta"))
    args = parser.parse_args()
    curves, times, checks = load(args.records)
    if not curves:
        raise SystemExit(f"no curve records in {args.records}")
    args.out.mkdir(parents=True, exist_ok=True)
    body = tables(curves, times, checks)
    plotted = [w for w in TITLES if any(k[0] == w for k in curves) and
               plot(w, curves, times, args.out / f"tta_{w}.png")]
    page = ["# Time to accuracy on the emulated cluster: generated tables", "",
            "Produced by `bash launch/tta.sh` (its records are in [records/](records)), then", "",
            f"    .venv/bin/python examples/tta_report.py {args.records} --out {args.out}", "",
            *(__doc__.split("\n\n")[2:3]), "", *body,
            *(f"![{TITLES[w]}](tta_{w}.png)" for w in plotted), ""]
    (args.out / "tables.md").write_text("\n".join(page))
    print("\n".join(body))


if __name__ == "__main__":
    main()
