"""The paper's table, reproduced: does S predict fine-tuning multiplicity better than the baselines?

For each dataset: calibrate sigma on validation rows against a small seed
ensemble (`tabcons calibrate`), then for each shot count fine-tune M members,
score the reference member on the evaluation rows and compare S, the
confidence and MC-dropout with the ensemble's real multiplicity
(`tabcons evaluate`). Results are written after every configuration, so a
run that is cut off still leaves what it finished:

    benchmarks/results/paper_table.json   every number, the settings, the machine, the wall time
    benchmarks/results/paper_table.md     the table the README shows
    benchmarks/results/paper_table_<dataset>_<shots>.png, paper_table_calibration_<dataset>.png

    python benchmarks/paper_table.py --datasets credit-g,diabetes --shots 64,128 --seeds 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Clock, machine, write_result  # noqa: E402

from mlflow_tabcons.tracking.calibration import CalibrationGrid, ablation_table, run_calibration  # noqa: E402
from mlflow_tabcons.scoring.consistency import ScorerSettings  # noqa: E402
from mlflow_tabcons.evaluation.measures import json_ready, markdown_table  # noqa: E402
from mlflow_tabcons.tracking.evaluation_job import run_evaluation  # noqa: E402
from mlflow_tabcons.members.training import TrainSettings  # noqa: E402
from mlflow_tabcons.members.classifier import LoraSettings  # noqa: E402
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402


def _list(kind: type, text: str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="credit-g,diabetes")
    parser.add_argument("--shots", default="64,128", help="comma-separated shot counts")
    parser.add_argument("--shots-for", action="append", default=[], metavar="DATASET=LIST",
                        help="other shot counts for one dataset, e.g. credit-g=32,64 (repeatable)")
    parser.add_argument("--seeds", type=int, default=10, help="members M per configuration")
    parser.add_argument("--epochs", type=int, default=TrainSettings().epochs)
    parser.add_argument("--lora-layers", type=int, default=LoraSettings().layers, help="LoRA on the top N layers")
    parser.add_argument("--batch-size", type=int, default=TrainSettings().batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings().learning_rate, help="learning rate of the adapters")
    parser.add_argument("--head-lr", type=float, default=TrainSettings().head_learning_rate)
    parser.add_argument("--eval-rows", type=int, default=60)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=None, help="a stated relative sigma instead of calibrating")
    parser.add_argument("--sigmas", default="0.25,0.5,1,2", help="sigmas the calibration tries")
    parser.add_argument("--calibration-dataset", default=None,
                        help="calibrate once on this dataset and use its (relative) sigma everywhere; default: each its own")
    parser.add_argument("--calibration-seeds", type=int, default=3)
    parser.add_argument("--calibration-rows", type=int, default=40)
    parser.add_argument("--calibration-k", type=int, default=32, help="neighbours per row while sweeping sigma")
    parser.add_argument("--dropout-passes", type=int, default=16)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tracking-uri", default=None, help="default: a fresh SQLite store in a temporary folder")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="only merge the paper_table.json files of runs made side by side into --out-dir")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace, dataset: str, shots: int, seeds: int, sigma: float, k: int) -> TrainingConfig:
    return TrainingConfig(
        data=dataset, shots=shots, seeds=seeds, eval_rows=args.eval_rows, model=args.model, experiment="tabcons-paper-table",
        register=None,
        train=TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                            head_learning_rate=args.head_lr, lora=LoraSettings(layers=args.lora_layers)),
        scorer=ScorerSettings(k=k, sigma=sigma),
    )


def _copy_artifact(run_id: str, artifact: str, target: Path) -> None:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact)
    shutil.copyfile(local, target)


def _write(out_dir: Path, payload: dict[str, Any]) -> None:
    write_result(json_ready(payload), out_dir / "paper_table.json")
    settings = payload["settings"]
    lines = [
        markdown_table(payload["rows"]),
        f"M = {settings['seeds']} members per row (seed 0 is the reference), {settings['epochs']} epochs of batch "
        f"{settings['batch_size']}, learning rates {settings['lr']:g} (LoRA) / {settings['head_lr']:g} (head), LoRA on the top "
        f"{settings['lora_layers']} layer(s) of MiniLM-L6, balanced class weights with the training rows' class prior folded "
        f"back into the head (class_prior=data), {settings['eval_rows']} stratified test rows, k = {settings['k']}, "
        f"alpha = 0.05 (empirical Bernstein), MC-dropout with {settings['dropout_passes']} passes. acc, bal. acc, AUROC: "
        "the members' mean accuracy, balanced accuracy and AUROC on the test rows; majority: the majority-class rate; "
        "arbitr.: share of rows on which some members disagree. rho(PR): Spearman "
        "correlation with the members' prediction range (negative is good); AUROC: for \"all members agree with the "
        "reference\" (above 0.5 is good); cert. agreement: mean share of the other members agreeing with the reference "
        "on certified rows.",
    ]
    for dataset, calibration in payload["calibrations"].items():
        used_for = settings["datasets"] if settings["calibration_dataset"] == dataset else dataset
        lines.append(
            f"sigma = {calibration['sigma']:g} (relative to ||E(x)||_F) for {used_for}: calibrated on {calibration['n_rows']} "
            f"{dataset} validation rows against {calibration['seeds']} seeds at {calibration['shots']} shots "
            f"(ablation in paper_table_calibration_{dataset}.md; the k it reports there: {calibration['k']})."
        )
    if settings["sigma"] is not None:
        lines.append(f"sigma = {settings['sigma']:g} (relative to ||E(x)||_F), stated, not calibrated.")
    split = f", the sum of {len(payload['parts'])} processes run side by side" if len(payload.get("parts", [])) > 1 else ""
    loads = payload.get("load_averages") or [float("nan")]
    threads = payload["machine"]["torch_threads"]
    lines.append(f"Wall time: {payload['seconds_total'] / 60:.1f} min{split}, on {payload['machine']['cores']} CPU cores "
                 f"({payload['machine']['cpu']}), {threads} torch thread(s) per process; 1-minute load average "
                 f"{min(loads):.1f}-{max(loads):.1f} at the end of each configuration (above {payload['machine']['cores']}: "
                 "other jobs shared the cores).")
    (out_dir / "paper_table.md").write_text("\n\n".join(lines) + "\n")


def combine(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """One table from runs made side by side; their wall times add up (each ran on the same shared cores)."""
    parts = [json.loads(path.read_text()) for path in paths]
    payload = {**parts[0], "rows": [], "calibrations": {}, "seconds_total": 0.0, "cpu_seconds_total": 0.0,
               "load_averages": [load for part in parts for load in part.get("load_averages", [])],
               "parts": [part["settings"] for part in parts]}
    for part in parts:
        payload["rows"] += part["rows"]
        payload["calibrations"].update(part["calibrations"])
        payload["seconds_total"] += part["seconds_total"]
        payload["cpu_seconds_total"] += part.get("cpu_seconds_total", 0.0)
    payload["rows"].sort(key=lambda row: (row["dataset"], row["shots"]))
    _write(out_dir, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return combine([Path(path) for path in args.combine], out_dir)
    mlflow.set_tracking_uri(args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='paper-table-')}/mlflow.db")
    shots = _list(int, args.shots)
    shots_for = {name: _list(int, counts) for name, counts in (item.split("=", 1) for item in args.shots_for)}
    clock = Clock()
    payload: dict[str, Any] = {
        "machine": machine(),
        "settings": {key: value for key, value in vars(args).items() if key not in ("tracking_uri", "out_dir")},
        "calibrations": {},
        "rows": [],
        "seconds_total": 0.0,
        "load_averages": [],
    }

    def calibrated(dataset: str) -> float:
        grid = CalibrationGrid(sigmas=tuple(_list(float, args.sigmas)), ks=(args.calibration_k, args.k),
                               sweep_k=args.calibration_k, rows=args.calibration_rows)
        fewest = min(shots_for.get(dataset, shots))
        calibration = run_calibration(_config(args, dataset, fewest, args.calibration_seeds, 0.5, args.k), grid)
        payload["calibrations"][dataset] = calibration
        _copy_artifact(calibration["run_id"], "tabcons/calibration.png", out_dir / f"paper_table_calibration_{dataset}.png")
        (out_dir / f"paper_table_calibration_{dataset}.md").write_text(ablation_table(calibration["ablation"], calibration))
        return calibration["sigma"]

    sigmas: dict[str, float] = {}

    def sigma_for(dataset: str) -> float:
        if args.sigma is not None:
            return args.sigma
        source = args.calibration_dataset or dataset
        if source not in sigmas:
            sigmas[source] = calibrated(source)
        return sigmas[source]

    for position in range(len(shots)):  # every dataset at its first shot count first: a run cut short still covers both
        for dataset in _list(str, args.datasets):
            count = shots_for.get(dataset, shots)[position]
            sigma = sigma_for(dataset)
            result = run_evaluation(_config(args, dataset, count, args.seeds, sigma, args.k), dropout_passes=args.dropout_passes)
            payload["rows"].append(result)
            _copy_artifact(result["parent_run_id"], "tabcons/measures_vs_range.png", out_dir / f"paper_table_{dataset}_{count}.png")
            payload["seconds_total"], payload["cpu_seconds_total"] = clock.lap()
            payload["load_averages"].append(os.getloadavg()[0])
            _write(out_dir, payload)
            print(json.dumps(json_ready({k: result[k] for k in ("dataset", "shots", "accuracy_mean", "majority_rate", "measures",
                                                                 "certified_agreement")})), flush=True)
    return payload


if __name__ == "__main__":
    main()
