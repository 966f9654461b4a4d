"""The paper's table, measured fairly: does S carry a signal about fine-tuning multiplicity that confidence does not?

For each dataset and shot count: fine-tune M members once, then

1. calibrate on held-out rows (validation split, topped up with unused training
   rows) with the same members: every candidate neighbourhood (site x noise x
   sigma at the evaluation's k) is judged by the stated objective
   (``mlflow_tabcons.evaluation.objective``);
2. score the reference member on the evaluation rows at every candidate and
   compare S, confidence and MC-dropout with the other M-1 members' multiplicity
   (bootstrap intervals, paired differences, the certificate against matched
   baselines). The calibrated candidate is marked; every candidate is a row.

Results are written after every configuration, so a run cut short still leaves what it finished:

    benchmarks/results/<name>.json, <name>.md    every number, the settings, the machine, the wall time
    benchmarks/results/<name>_<dataset>_<shots>_{sites,calibration,measures}.png

    python benchmarks/paper_table.py --datasets diabetes --shots 128 --seeds 10 --eval-rows 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Clock, eval_rows_available, machine, write_result  # noqa: E402

from mlflow_tabcons.data.serialize import NUMBER_STYLES  # noqa: E402
from mlflow_tabcons.evaluation.measures import json_ready, markdown_table  # noqa: E402
from mlflow_tabcons.evaluation.objective import Objective, goal_checks  # noqa: E402
from mlflow_tabcons.members.classifier import LoraSettings  # noqa: E402
from mlflow_tabcons.members.recipe import RECIPE_MODES  # noqa: E402
from mlflow_tabcons.members.training import TrainSettings  # noqa: E402
from mlflow_tabcons.scoring.consistency import ScorerSettings  # noqa: E402
from mlflow_tabcons.tracking.calibration import (  # noqa: E402
    CalibrationGrid,
    ablation_figure,
    ablation_table,
    choose_neighbourhood,
    held_out_rows,
    sweep_neighbourhoods,
)
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402
from mlflow_tabcons.tracking.evaluation_job import (  # noqa: E402
    MEASURE_LABELS,
    evaluate_scores,
    measures_figure,
    reference_dropout,
    rescore,
)
from mlflow_tabcons.runtime import configure_threads, default_device  # noqa: E402
from mlflow_tabcons.tracking import resume  # noqa: E402
from mlflow_tabcons.tracking.prepared import TrainingOutcome, prepare_data  # noqa: E402
from mlflow_tabcons.tracking.training_job import build_trainer, run_training  # noqa: E402

NEIGHBOURHOOD = ("perturb", "noise", "sigma")


def _list(kind: type, text: str) -> list:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="credit-g,diabetes")
    parser.add_argument("--shots", default="128,256", help="comma-separated shot counts")
    parser.add_argument("--seeds", type=int, default=10, help="members M per configuration")
    parser.add_argument("--epochs", type=int, default=TrainSettings().epochs)
    parser.add_argument("--lora-layers", type=int, default=LoraSettings().layers, help="LoRA on the top N layers")
    parser.add_argument("--recipe-budget", type=int, default=TrainingConfig.recipe_budget,
                        help="trials of the members' recipe search (2: only how numbers read)")
    parser.add_argument("--recipe", choices=RECIPE_MODES, default=TrainingConfig.recipe,
                        help="auto: search the members' recipe; fixed: train with --epochs, --lr, --head-lr as given")
    parser.add_argument("--numbers", choices=("auto", *NUMBER_STYLES), default=TrainingConfig.numbers,
                        help="how numbers read (auto: the recipe search or the table decides)")
    parser.add_argument("--lr", type=float, help="the adapters' learning rate (default: the head's, DEFAULT_RATES)")
    parser.add_argument("--head-lr", type=float, help="the head's learning rate (default: the head's, DEFAULT_RATES)")
    parser.add_argument("--train-precision", default="bfloat16")
    parser.add_argument("--scorer-precision", default="bfloat16")
    parser.add_argument("--eval-rows", type=int, default=200, help="test rows (all of them where the split has fewer)")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--bound", default=ScorerSettings().bound, help="the certificate's lower bound (empirical-bernstein, betting, ...)")
    parser.add_argument("--tau", type=float, default=ScorerSettings().tau, help="a row is certified when its lower bound exceeds tau")
    parser.add_argument("--sites", default="embeddings,values,hidden,pooled")
    parser.add_argument("--sigmas", default="0.25,0.5,1")
    parser.add_argument("--extra", default="hidden:gaussian:0.5,pooled:gaussian:0.5",
                        help="settings measured on the evaluation rows only (not calibration candidates), as site:noise:sigma")
    parser.add_argument("--calibration-rows", type=int, default=100)
    parser.add_argument("--min-certified", type=float, default=Objective().min_certified)
    parser.add_argument("--dropout-passes", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--name", default="paper_table", help="file name stem of the results")
    parser.add_argument("--tracking-uri", default=None, help="default: a fresh SQLite store in a temporary folder")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--reuse-run", default=None, metavar="RUN_ID",
                        help="measure the --extra settings on the members of a finished ensemble run in --tracking-uri "
                             "(no training, no calibration); --datasets/--shots must name its configuration")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="only merge the JSON files of runs made side by side into --out-dir/--name")
    return parser.parse_args(argv)


def candidates(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The calibration grid (sites x sigmas, sphere) and the extra settings measured on the evaluation rows only."""
    grid = CalibrationGrid(sites=tuple(_list(str, args.sites)), sigmas=tuple(_list(float, args.sigmas)), rows=args.calibration_rows)
    extra = []
    for item in _list(str, args.extra):
        site, noise, sigma = item.split(":")
        extra.append({"perturb": site, "noise": noise, "sigma": float(sigma)})
    return grid.candidates(), extra


def _config(args: argparse.Namespace, dataset: str, shots: int, first: dict[str, Any]) -> TrainingConfig:
    return TrainingConfig(
        data=dataset, shots=shots, seeds=args.seeds, eval_rows=eval_rows_available(dataset, args.eval_rows), model=args.model,
        experiment="tabcons-paper-table", register=None, recipe=args.recipe, recipe_budget=args.recipe_budget, numbers=args.numbers,
        train=TrainSettings(epochs=args.epochs, learning_rate=args.lr, head_learning_rate=args.head_lr,
                            precision=args.train_precision, lora=LoraSettings(layers=args.lora_layers)),
        scorer=ScorerSettings(k=args.k, precision=args.scorer_precision, bound=args.bound, tau=args.tau, **first),
    )


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[key] == b[key] for key in NEIGHBOURHOOD)


def goal_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per row: which parts of the goal it meets."""
    lines = ["| dataset | shots | site | noise | sigma | calibrated | " + " | ".join(goal_checks(rows[0])) + " |",
             "|" + "---|" * (6 + len(goal_checks(rows[0])))]
    for row in rows:
        checks = goal_checks(row)
        lines.append(f"| {row['dataset']} | {row['shots']} | {row['perturb']} | {row['noise']} | {row['sigma']:g} | "
                     f"{'yes' if row.get('calibrated') else ''} | " + " | ".join("yes" if ok else "no" for ok in checks.values()) + " |")
    return lines


def _members_recipe(rows: list[dict[str, Any]], configured_layers: int | None) -> str:
    """Epochs, LoRA layers and learning rates the members trained with (the recipe search's, not the configured), per
    dataset and shots.

    Rows written before the evaluation recorded its LoRA layers fall back to the configured ones; rows written
    before it recorded the learning rates name none.
    """
    def rates(row: dict[str, Any]) -> str:
        return f", learning rates {row['learning_rate']:g} / {row['head_learning_rate']:g}" if "learning_rate" in row else ""

    recipes = {(row["dataset"], row["shots"]): (row["epochs"], row.get("lora_layers", configured_layers or "all"), rates(row))
               for row in rows}
    return "; ".join(f"{dataset} {shots}: {epochs} epochs, LoRA on {layers if layers == 'all' else f'the top {layers}'} layers{lr}"
                     for (dataset, shots), (epochs, layers, lr) in recipes.items())


def _write(out_dir: Path, name: str, payload: dict[str, Any]) -> None:
    write_result(json_ready(payload), out_dir / f"{name}.json")
    rows, settings = payload["rows"], payload["settings"]
    if not rows:
        return
    lines = [
        markdown_table(rows),
        f"M = {settings['seeds']} members per configuration (seed 0 is the reference; the truth comes from the other "
        f"{settings['seeds'] - 1}), {_members_recipe(rows, settings['lora_layers'])} of {settings['model']}, training in "
        f"{settings['train_precision']}, neighbour passes in {settings['scorer_precision']}; "
        f"k = {settings['k']}, alpha = 0.05; sigma relative to the norm of what is "
        f"perturbed; MC-dropout with {settings['dropout_passes']} passes. Intervals: 95% bootstrap over rows "
        f"({settings['resamples']} resamples), paired for differences; certified fraction: Clopper-Pearson.",
        "Goal per row:\n\n" + "\n".join(goal_summary(rows)),
    ]
    for key, calibration in payload["calibrations"].items():
        lines.append(f"Calibration for {key} on {calibration['n_rows']} held-out rows ({calibration['seconds_score']:.0f} s of "
                     f"scoring): chose {calibration['perturb']}, {calibration['noise']}, sigma {calibration['sigma']:g}; "
                     f"{calibration['chosen_by']}.\n\n" + ablation_table(calibration["candidates"], calibration))
    if payload.get("not_run"):
        lines.append("Asked for but not measured (the run stopped first): " + ", ".join(payload["not_run"]) + ".")
    loads = payload.get("load_averages")
    cores = payload["machine"]["cores"]
    shared = f" (above {cores}: other jobs shared the cores)" if loads and max(loads) > cores else ""
    load = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} after each configuration{shared}" if loads else "load average not recorded"
    runs = payload.get("runs") or [_run_time(payload)]
    times = ", ".join(f"{run['datasets']} {run['seconds'] / 60:.1f} min ({run['torch_threads']} torch thread(s))" for run in runs)
    side_by_side = " side by side" if len(runs) > 1 else ""
    lines.append(f"Wall time{side_by_side}: {times} on {cores} CPU cores ({payload['machine']['cpu']}); {load}.")
    (out_dir / f"{name}.md").write_text("\n\n".join(lines) + "\n")


def _run_time(payload: dict[str, Any]) -> dict[str, Any]:
    """One run's datasets, wall time and torch threads."""
    return {"datasets": payload["settings"]["datasets"], "seconds": payload["seconds_total"],
            "torch_threads": payload["machine"]["torch_threads"]}


def not_measured(settings: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """The dataset and shot counts some run was asked for that no row measures (a run stopped early)."""
    asked = {(dataset, int(shots)) for part in settings
             for dataset in _list(str, part["datasets"]) for shots in _list(int, str(part["shots"]))}
    measured = {(row["dataset"], int(row["shots"])) for row in rows}
    return [f"{dataset} {shots}" for dataset, shots in sorted(asked - measured)]


def combine(paths: list[Path], out_dir: Path, name: str) -> dict[str, Any]:
    """One table from runs made side by side (a combined file's own parts are kept, not nested)."""
    parts = [json.loads(path.read_text()) for path in paths]
    settings = [setting for part in parts for setting in part.get("parts") or [part["settings"]]]
    # side by side, the runs' wall times overlap: each is kept with its own thread count, never summed
    runs = [run for part in parts for run in part.get("runs") or [_run_time(part)]]
    payload = {**parts[0], "rows": [], "calibrations": {}, "seconds_total": max(run["seconds"] for run in runs), "runs": runs,
               "load_averages": [load for part in parts for load in part.get("load_averages", [])], "parts": settings}
    for part in parts:
        payload["rows"] += part["rows"]
        payload["calibrations"].update(part["calibrations"])
    payload["rows"].sort(key=lambda row: (row["dataset"], row["shots"]))
    payload["not_run"] = not_measured(settings, payload["rows"])
    _write(out_dir, name, payload)
    return payload


def reloaded_outcome(config: TrainingConfig, run_id: str, first: dict[str, Any]) -> TrainingOutcome:
    """The trained ensemble of a finished run, rebuilt from its member runs, scored at ``first``.

    The members are rebuilt with the recipe the run chose (settings and number style), not the configured one.
    """
    parent = mlflow.get_run(run_id)
    chosen = resume.stored_recipe(parent)
    if chosen is not None:
        config = replace(config, train=chosen[0], numbers=chosen[1])
    data = prepare_data(config)
    trainer = build_trainer(config, data, default_device(), validate=False)
    runs = resume.finished_member_runs(resume.child_runs(parent))
    members = [resume.load_member(trainer, runs[seed]) for seed in sorted(runs)]
    eval_prefix = trainer.prefix_for(data.evaluation)
    probabilities = np.stack([trainer.predict_proba(member.classifier, data.evaluation, eval_prefix) for member in members])
    outcome = TrainingOutcome(run_id, data, trainer, members, probabilities, None, dict(parent.data.metrics), None, eval_prefix)
    outcome.scores, outcome.metrics["seconds_score"] = rescore(outcome, config.scorer.with_overrides(**first))
    return outcome


def run_configuration(args: argparse.Namespace, dataset: str, shots: int, grid: list[dict[str, Any]], extra: list[dict[str, Any]],
                      out_dir: Path, payload: dict[str, Any]) -> None:
    """Train once; calibrate on held-out rows; evaluate every candidate and extra setting on the test rows."""
    config = _config(args, dataset, shots, grid[0])
    key = f"{dataset}_{shots}"
    if args.reuse_run:
        configure_threads()
        outcome = reloaded_outcome(config, args.reuse_run, extra[0])
        evaluate_settings(args, config, outcome, extra, None, out_dir, payload, key)
        return
    outcome = run_training(config)
    trainer, data = outcome.trainer, outcome.data
    # 1. calibration on held-out rows, with the same members
    rows = held_out_rows(config, data, args.calibration_rows)
    prefix = trainer.prefix_for(rows)
    started = time.perf_counter()
    held_out = np.stack([trainer.predict_proba(member.classifier, rows, prefix) for member in outcome.members])
    swept = sweep_neighbourhoods(outcome.members[0], config.train, config.scorer, rows, held_out, grid,
                                 device=trainer.device, resamples=args.resamples)
    chosen = choose_neighbourhood(swept, Objective(args.min_certified))
    payload["calibrations"][key] = {**chosen, "n_rows": len(rows), "seeds": len(outcome.members), "candidates": swept,
                                    "seconds_score": float(sum(row["seconds"] for row in swept)),
                                    "seconds_total": time.perf_counter() - started}
    ablation_figure(swept, chosen).savefig(out_dir / f"{args.name}_{key}_calibration.png", dpi=110)
    # 2. every candidate on the evaluation rows
    evaluate_settings(args, config, outcome, grid + extra, chosen, out_dir, payload, key)


def evaluate_settings(args: argparse.Namespace, config: TrainingConfig, outcome: TrainingOutcome, settings: list[dict[str, Any]],
                      chosen: dict[str, Any] | None, out_dir: Path, payload: dict[str, Any], key: str) -> None:
    """Every setting on the evaluation rows (the first one reuses the outcome's own scores); ``chosen``: the calibrated one."""
    dataset, shots = config.data, config.shots
    dropout, seconds_dropout = reference_dropout(outcome, passes=args.dropout_passes, seed=config.scorer.seed)
    results = []
    for candidate in settings:
        if _same(candidate, {key_: getattr(outcome.scores.settings, key_) for key_ in NEIGHBOURHOOD}):
            scores, seconds = outcome.scores, outcome.metrics["seconds_score"]
        else:
            scores, seconds = rescore(outcome, config.scorer.with_overrides(**candidate))
        result, per_row = evaluate_scores(outcome, scores, dropout, seconds_score=seconds, seconds_dropout=seconds_dropout,
                                          resamples=args.resamples)
        result["calibrated"] = chosen is not None and _same(candidate, chosen)
        result["goal"] = goal_checks(result)
        results.append(result)
        payload["rows"].append(result)
        if result["calibrated"]:
            title = f"{dataset}, {shots} shots, {result['seeds']} members: {result['perturb']}, sigma {result['sigma']:g}"
            figure = measures_figure({name: per_row[name] for name in MEASURE_LABELS}, per_row["prediction_range"], title)
            figure.savefig(out_dir / f"{args.name}_{key}_measures.png", dpi=110)
        print(json.dumps(json_ready({k: result[k] for k in ("dataset", "shots", "perturb", "noise", "sigma", "certified_fraction",
                                                             "spearman_consistency_confidence", "goal")}
                                    | {"difference": result["comparisons"]["consistency_minus_confidence"]})), flush=True)
        payload["seconds_total"] = payload["clock"].lap()[0]
        _write(out_dir, args.name, {k: v for k, v in payload.items() if k != "clock"})
    if chosen is not None:
        figure = ablation_figure(results, chosen, scored_on=f"{len(outcome.data.evaluation)} evaluation rows")
        figure.savefig(out_dir / f"{args.name}_{key}_sites.png", dpi=110)
    payload["load_averages"].append(os.getloadavg()[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return combine([Path(path) for path in args.combine], out_dir, args.name)
    mlflow.set_tracking_uri(args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='paper-table-')}/mlflow.db")
    grid, extra = candidates(args)
    payload: dict[str, Any] = {
        "machine": machine(),
        "settings": {key: value for key, value in vars(args).items() if key not in ("tracking_uri", "out_dir", "combine")},
        "calibrations": {},
        "rows": [],
        "seconds_total": 0.0,
        "load_averages": [],
        "clock": Clock(),
    }
    for shots in _list(int, args.shots):
        for dataset in _list(str, args.datasets):
            run_configuration(args, dataset, shots, grid, extra, out_dir, payload)
            _write(out_dir, args.name, {k: v for k, v in payload.items() if k != "clock"})
    return {k: v for k, v in payload.items() if k != "clock"}


if __name__ == "__main__":
    main()
