"""Where a member's threshold goes: the class-prior grid alone against the grid and every cut between validation rows.

The same members, trained as `tabcons train --recipe fixed` trains them with the
class prior left as trained; each rule chooses its weight on the validation rows
(`best_class_prior` with and without `whole_line`), and both are judged on every
row no member saw (the test split and the training split outside the shots), by
accuracy and the stated test's p-value against the majority class.

    python benchmarks/class_prior_rules.py --model smollm2 --data diabetes --splits 0,1 --seeds 3 \
        --numbers words --epochs 4 --schedule-epochs 8 --lora-layers 3 [--precision bfloat16] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_result  # noqa: E402

from mlflow_tabcons.members.classifier import LoraSettings  # noqa: E402
from mlflow_tabcons.members.training import TrainSettings, best_class_prior, prior_shift  # noqa: E402
from mlflow_tabcons.metrics.classification import mcnemar_vs_majority  # noqa: E402
from mlflow_tabcons.runtime import configure_threads  # noqa: E402
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402
from mlflow_tabcons.tracking.prepared import prepare_data  # noqa: E402
from mlflow_tabcons.tracking.training_job import build_trainer  # noqa: E402

RULES = {"grid": False, "whole line": True}


def judged(probabilities, validation_probabilities, data, train_labels, class_weight, whole_line: bool) -> dict:
    """The rule's weight, chosen on the validation rows, and its answers' accuracy and p-value on the unseen rows."""
    weight = best_class_prior(validation_probabilities, data.validation.labels, train_labels, class_weight, 1.0,
                              whole_line=whole_line)
    shift = prior_shift(train_labels, probabilities.shape[1], class_weight, weight)
    answers = np.argmax(np.log(np.maximum(probabilities, 1e-12)) + shift, axis=1)
    return {"weight": round(float(weight), 3), "accuracy": round(float(np.mean(answers == data.test.labels)), 4),
            "majority_pvalue": round(mcnemar_vs_majority(data.test.labels, answers), 4)}


def members(args: argparse.Namespace, table: str, split: int, device: str) -> list[dict]:
    train = TrainSettings(epochs=args.epochs, schedule_epochs=args.schedule_epochs, class_prior="uniform",
                          tune_class_prior=False, precision=args.precision, lora=LoraSettings(layers=args.lora_layers))
    config = TrainingConfig(data=table, model=args.model, shots=args.shots, train=train, register=None, recipe="fixed",
                            split_seed=split, numbers=args.numbers)
    data = prepare_data(config)
    trainer = build_trainer(config, data, device, validate=False)
    validation_prefix, test_prefix = trainer.prefix_for(data.validation), trainer.prefix_for(data.test)
    records = []
    for seed in range(args.seeds):
        member = trainer.train_member(seed)
        validation = trainer.predict_proba(member.classifier, data.validation, validation_prefix)
        unseen = trainer.predict_proba(member.classifier, data.test, test_prefix)
        train_labels = data.train.labels[member.train_rows]
        records.append({
            "data": table, "split_seed": split, "seed": seed, "validation_rows": len(validation), "unseen_rows": len(unseen),
            "majority_rate": round(float(np.bincount(data.test.labels).max() / len(data.test.labels)), 4),
            **{rule: judged(unseen, validation, data, train_labels, trainer.settings.class_weight, whole_line)
               for rule, whole_line in RULES.items()},
        })
        print(records[-1], flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="credit-g,diabetes", help="tables, comma-separated")
    parser.add_argument("--splits", default="0", help="split seeds, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=128)
    parser.add_argument("--numbers", default="auto")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--schedule-epochs", type=int, default=None)
    parser.add_argument("--lora-layers", type=int, default=None)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--out", default=str(RESULTS / "class_prior_rules.json"))
    args = parser.parse_args()
    configure_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = [record for table in args.data.split(",") for split in map(int, args.splits.split(","))
               for record in members(args, table, split, device)]
    summary = {rule: {table: {"mean_accuracy": round(float(np.mean([r[rule]["accuracy"] for r in records if r["data"] == table])), 4),
                              "members_passing": sum(r[rule]["majority_pvalue"] <= 0.025 for r in records if r["data"] == table)}
                      for table in args.data.split(",")} for rule in RULES}
    write_result({"what": __doc__.split("\n\n")[0], "settings": vars(args), "machine": machine(), "summary": summary,
                  "members": records}, args.out)


if __name__ == "__main__":
    main()
