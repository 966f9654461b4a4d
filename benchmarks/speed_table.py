"""The speed table of docs/benchmarks.md, rendered from the results files the speed benchmarks wrote.

    python benchmarks/speed_table.py [--out benchmarks/results/speed.md]

Reads results/scoring.json, training.json and serving.json (whichever exist)
and prints a markdown table: machine, date, medians and ratios against the
plain baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def scoring_lines(result: dict[str, Any]) -> list[str]:
    config = result["config"]
    lines = [
        f"| Certified scoring, {result['rows']} {config['data']} rows, k_max={result['k_max']} "
        f"(~{config['mean_tokens']:.0f} tokens) | ours ({config['backend']}, {config['precision']}, early stop) "
        f"{result['paths']['ours']['seconds']:.0f} s, baseline {result['seconds_baseline']:.0f} s | "
        f"**{result['speedup']:.1f}x**, decisions agree {result['decisions_agree']:.3f} |",
        f"| Scoring arithmetic rate | ours {result['achieved_gflops']:.0f} GFLOP/s of {result['peak_gflops']:.0f} "
        f"({config['precision']} matmul peak); baseline {result['baseline_gflops']:.0f} of "
        f"{result['peak_gflops_float32']:.0f} (float32) | {result['achieved_gflops'] / result['peak_gflops']:.0%} of peak |",
    ]
    float32 = result["paths"].get("ours_float32")
    if float32:
        lines.append(
            f"| Scoring, float32 early-stop path alone | {float32['seconds']:.0f} s, "
            f"{float32['mean_neighbours']:.0f} neighbours/row, {float32['achieved_gflops']:.0f} of "
            f"{result['peak_gflops_float32']:.0f} GFLOP/s | {float32['speedup']:.1f}x, agree {float32['decisions_agree']:.3f}, "
            f"{float32['achieved_gflops'] / result['peak_gflops_float32']:.0%} of float32 peak |"
        )
    return lines


def training_lines(result: dict[str, Any]) -> list[str]:
    config = result["config"]
    return [
        f"| Ensemble training, {config['seeds']} seeds x {config['shots']} {config['data']} rows x {config['epochs']} epochs "
        f"({result.get('precision_ours', 'float32')}) | ours {result['seconds_ours']:.0f} s, Trainer+PEFT "
        f"{result['seconds_baseline']:.0f} s (median member {result['median_member_seconds_ours']:.0f} s vs "
        f"{result['median_member_seconds_baseline']:.0f} s); accuracy {result['accuracy_ours']:.3f} vs "
        f"{result['accuracy_baseline']:.3f} | **{result['speedup']:.1f}x** (CPU time {result['cpu_speedup']:.1f}x, "
        f"medians {result['median_member_seconds_baseline'] / result['median_member_seconds_ours']:.1f}x) |"
    ]


def serving_lines(result: dict[str, Any]) -> list[str]:
    batch = next(key for key in result if key.endswith("_rows") and key != "one_row")
    one, many = result["one_row"], result[batch]
    precision = result["config"]["scorer"].get("precision", "float32")
    return [
        f"| `mlflow models serve`, k={result['config']['k']}, {precision}, early stop | 1 row: p50 {one['p50_s']:.2f} s, p95 {one['p95_s']:.2f} s "
        f"({one['requests']} requests); {batch.split('_')[0]} rows: p50 {many['p50_s']:.1f} s, p95 {many['p95_s']:.1f} s "
        f"({many['requests']} requests) | |"
    ]


def render() -> str:
    sections = [("scoring.json", scoring_lines), ("training.json", training_lines), ("serving.json", serving_lines)]
    loaded = [(name, result, lines) for name, lines in sections if (result := _load(name))]
    if not loaded:
        return "No speed results yet: run benchmarks/bench_scoring.py, bench_train.py, bench_serving.py.\n"
    runs: dict[str, list[str]] = {}  # one line per machine and date: the results may come from different runs
    for name, result, _ in loaded:
        machine = result["machine"]
        where = (f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']} threads)"
                 f"{', GPU ' + machine['cuda'] if machine['cuda'] else ''}; run {machine['date']}")
        runs.setdefault(where, []).append(name.removesuffix(".json"))
    head = [
        *(f"Machine ({', '.join(names)}): {where}." for where, names in runs.items()),
        "",
        "| What | Measured (medians) | Ratio |",
        "| --- | --- | --- |",
    ]
    body = [line for _, result, lines in loaded for line in lines(result)]
    return "\n".join(head + body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "speed.md"))
    args = parser.parse_args()
    table = render()
    Path(args.out).write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
