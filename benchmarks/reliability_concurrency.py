"""Concurrency on the store: several `tabcons train` processes on one tracking database lose nothing.

Starts N real `tabcons train` processes at once on the same SQLite file or
PostgreSQL database, all in the same experiment and registering into the same
model name, waits for them, then counts what the store holds: every parent
and child run FINISHED, every expected metric present with its full history,
one model version per process. Writes the counts to reliability.json.

    python benchmarks/reliability_concurrency.py            # 2 on SQLite, 8 on PostgreSQL
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import RESULTS, Clock, machine, update_result  # noqa: E402

TABCONS = str(Path(sys.executable).parent / "tabcons")
SEEDS, EPOCHS = 2, 1
CHILD_METRICS = ("train_loss", "val_accuracy", "accuracy", "balanced_accuracy", "majority_rate")
PARENT_METRICS = ("members_succeeded", "accuracy_mean", "arbitrariness", "certified_fraction")


@dataclass
class ConcurrencyResult:
    processes: int
    exit_codes: list[int]
    runs_expected: int
    runs_recorded: int
    runs_finished: int
    metric_values_expected: int
    metric_values_recorded: int
    model_versions: int
    runs_lost: int
    wall_seconds: float


def train_command(model: str, experiment: str, register: str) -> list[str]:
    return [TABCONS, "train", "--data", "diabetes", "--model", model, "--shots", "24", "--epochs", str(EPOCHS),
            "--eval-rows", "20", "--k", "8", "--batch-size", "8", "--seeds", str(SEEDS),
            # every run counted must be expected: members that do not learn would add a replacement's run
            "--max-replacements", "0", "--experiment", experiment, "--register", register]


def run_concurrently(uri: str, processes: int, model: str, logs: Path) -> ConcurrencyResult:
    """Start ``processes`` trainings on ``uri`` at once, wait, and count what the store recorded."""
    experiment, register = f"concurrency-{uuid.uuid4().hex[:8]}", f"concurrency-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_RUN_ID", None)
    logs.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    running = []
    for index in range(processes):
        log = open(logs / f"train-{index}.log", "w")
        running.append((subprocess.Popen(train_command(model, experiment, register), env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log))
    codes = []
    for process, log in running:
        codes.append(process.wait(timeout=3600))
        log.close()
    wall, _ = clock.lap()
    return count_recorded(uri, experiment, register, processes, codes, wall)


def count_recorded(uri: str, experiment: str, register: str, processes: int, codes: list[int], wall: float) -> ConcurrencyResult:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=10000) if found else []
    parents = [r for r in runs if r.data.tags.get("tabcons.role") == "ensemble"]
    children = [r for r in runs if r.data.tags.get("tabcons.role") == "member"]
    recorded = 0
    for child in children:
        recorded += sum(len(client.get_metric_history(child.info.run_id, key)) for key in CHILD_METRICS)
    for parent in parents:
        recorded += sum(key in parent.data.metrics for key in PARENT_METRICS)
    # per child: one value per epoch for the per-epoch metrics, one for the final scores
    per_child = EPOCHS * 2 + 3
    expected_runs = processes * (1 + SEEDS)
    versions = client.search_model_versions(f"name = '{register}'")
    return ConcurrencyResult(
        processes=processes,
        exit_codes=codes,
        runs_expected=expected_runs,
        runs_recorded=len(parents) + len(children),
        runs_finished=sum(r.info.status == "FINISHED" for r in parents + children),
        metric_values_expected=processes * (SEEDS * per_child + len(PARENT_METRICS)),
        metric_values_recorded=recorded,
        model_versions=len(versions),
        runs_lost=expected_runs - sum(r.info.status == "FINISHED" for r in parents + children),
        wall_seconds=round(wall, 1),
    )


def postgres_database(admin_uri: str) -> tuple[str, callable]:
    """A fresh database on the server, and a function that drops it."""
    import sqlalchemy

    name = f"tabcons_concurrency_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin_uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'create database "{name}"'))

    def drop() -> None:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'drop database if exists "{name}" with (force)'))
        engine.dispose()

    return admin_uri.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlite-processes", type=int, default=2)
    parser.add_argument("--postgres-processes", type=int, default=8)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="Admin URI of a PostgreSQL server ('' to skip).")
    parser.add_argument("--out", default=str(RESULTS / "reliability.json"))
    args = parser.parse_args()
    from tests.conftest import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = str(build_tiny_checkpoint(work / "tiny-bert", layers=4))
        results = {"sqlite": run_concurrently(f"sqlite:///{work / 'mlflow.db'}", args.sqlite_processes, model, work / "sqlite")}
        if args.postgres and args.postgres_processes:
            uri, drop = postgres_database(args.postgres)
            try:
                results["postgresql"] = run_concurrently(uri, args.postgres_processes, model, work / "postgresql")
            finally:
                drop()
        for name, result in results.items():
            print(name, asdict(result))
            if any(result.exit_codes):
                failed = next(i for i, code in enumerate(result.exit_codes) if code)
                print((work / name / f"train-{failed}.log").read_text()[-3000:])
    update_result(
        "concurrency",
        {"machine": machine(), "seeds_per_process": SEEDS, "epochs": EPOCHS,
         **{name: asdict(result) for name, result in results.items()}},
        args.out,
    )


if __name__ == "__main__":
    main()
