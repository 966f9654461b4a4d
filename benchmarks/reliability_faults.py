"""Faults in training: members that raise, and `tabcons train` killed with SIGKILL, lose nothing.

Scenario "raise": an ensemble whose members raise for some seeds, in
process; then `--resume` trains exactly those seeds. Scenario "sigkill": a
real `tabcons train` subprocess killed with SIGKILL each time one more child
run has FINISHED, resumed and killed again, then resumed to the end. After
each fault the SQLite file must pass ``pragma integrity_check`` and every
child that had FINISHED must still be FINISHED with the same metrics.

    python benchmarks/reliability_faults.py [--kills 2] [--seeds 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import RESULTS, machine, update_result  # noqa: E402

TABCONS = str(Path(sys.executable).parent / "tabcons")


def finished_children(db: Path) -> int:
    """FINISHED child runs in the SQLite file, read without taking MLflow's store (0 before its tables exist)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        try:
            return connection.execute(
                "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'mlflow.parentRunId' and r.status = 'FINISHED'"
            ).fetchone()[0]
        except sqlite3.OperationalError as error:  # the training process is still creating the schema
            if "no such table" in str(error):
                return 0
            raise


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as connection:
        return connection.execute("pragma integrity_check").fetchone()[0]


def train_until_killed(command: list[str], env: dict[str, str], db: Path, finished: int, timeout: float = 900) -> bool:
    """Run ``command`` and SIGKILL it once ``finished`` child runs are FINISHED; False if it ended first."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if db.exists() and finished_children(db) >= finished:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.2)
    process.kill()
    process.wait()
    return False


def snapshot(uri: str) -> dict[str, tuple[str, str, dict]]:
    """run id -> (status, seed, metrics) of every child run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`tabcons.role` = 'member'")
    return {r.info.run_id: (r.info.status, r.data.params.get("seed"), r.data.metrics) for r in runs}


def lost(before: dict, after: dict) -> int:
    """Children FINISHED before a fault that are gone, no longer FINISHED, or changed afterwards."""
    return sum(1 for run_id, state in before.items() if state[0] == "FINISHED" and after.get(run_id) != state)


def parent_id(uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`tabcons.role` = 'ensemble'")
    assert len(runs) == 1, f"expected one parent run, found {len(runs)}"
    return runs[0].info.run_id


def sigkill_scenario(model: str, folder: Path, kills: int, seeds: int) -> dict:
    db = folder / "sigkill.db"
    uri = f"sqlite:///{db}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [TABCONS, "train", "--data", "diabetes", "--model", model, "--shots", "96", "--epochs", "25",
               "--eval-rows", "20", "--k", "16", "--batch-size", "8", "--seeds", str(seeds), "--register", "none"]
    killed, runs_lost, checks = 0, 0, []
    state: dict = {}
    for kill in range(1, kills + 1):
        run = command if kill == 1 else [TABCONS, "train", "--resume", parent_id(uri)]
        killed += train_until_killed(run, env, db, finished=kill)
        checks.append(integrity(db))
        now = snapshot(uri)
        runs_lost += lost(state, now)
        state = now
    resumed = subprocess.run([TABCONS, "train", "--resume", parent_id(uri)], env=env, capture_output=True, text=True)
    final = snapshot(uri)
    runs_lost += lost(state, final)
    trained = [seed for status, seed, _ in final.values() if status == "FINISHED"]
    import mlflow

    parent = mlflow.MlflowClient(tracking_uri=uri).get_run(parent_id(uri))
    return {
        "seeds": seeds,
        "sigkills_injected": killed,
        "integrity_checks": checks,
        "final_exit_code": resumed.returncode,
        "parent_status": parent.info.status,
        "members_succeeded": parent.data.metrics.get("members_succeeded"),
        "children_killed_mid_training": sum(status == "KILLED" for status, _, _ in final.values()),
        "children_finished": len(trained),
        "seeds_trained_more_than_once": len(trained) - len(set(trained)),
        "runs_lost": runs_lost,
    }


def raise_scenario(model: str, folder: Path, seeds: int, faulty: set[int]) -> dict:
    import mlflow

    from mlflow_tabcons.members.training import EnsembleTrainer, TrainSettings
    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.training_job import run_training

    uri = f"sqlite:///{folder / 'raise.db'}"
    mlflow.set_tracking_uri(uri)
    original, attempts = EnsembleTrainer.train_member, []

    def flaky(self, seed, **kwargs):
        attempts.append(seed)
        if seed in faulty:
            raise RuntimeError(f"injected fault in seed {seed}")
        return original(self, seed, **kwargs)

    config = TrainingConfig(data="diabetes", model=model, shots=24, eval_rows=20, seeds=seeds, register=None,
                            train=TrainSettings(epochs=1, batch_size=8))
    EnsembleTrainer.train_member = flaky
    try:
        first = run_training(config)
        before = snapshot(uri)
        injected = len(faulty)
        faulty.clear()
        attempts.clear()
        run_training(config, first.parent_run_id)
    finally:
        EnsembleTrainer.train_member = original
        mlflow.set_tracking_uri(None)
    after = snapshot(uri)
    return {
        "seeds": seeds,
        "faults_injected": injected,
        "children_failed_marked": sum(status == "FAILED" for status, _, _ in before.values()),
        "seeds_retrained_on_resume": sorted(attempts),
        "runs_lost": lost(before, after),
        "children_finished_after_resume": sum(status == "FINISHED" for status, _, _ in after.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "reliability.json"))
    args = parser.parse_args()
    from tests.conftest import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = str(build_tiny_checkpoint(work / "tiny-bert", layers=4))
        results = {
            "raise": raise_scenario(model, work, args.seeds, {1, 3}),
            "sigkill": sigkill_scenario(model, work, args.kills, args.seeds),
        }
    print(results)
    update_result("training_faults", {"machine": machine(), **results}, args.out)


if __name__ == "__main__":
    main()
