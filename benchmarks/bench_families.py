"""SmolLM2 (decoder, verbalizer) against MiniLM (encoder, linear head): seconds per scored row and per member epoch.

Both run in this process on the same credit-g rows (compact template; the
decoder's rows end with "Answer:"), interleaved so machine drift hits both:
a scored row costs k + 1 full-depth forward passes, so the full-depth pass per
row is the unit; a member costs epochs x (top-LoRA-layers forward + backward)
over the frozen-prefix cache.

    python benchmarks/bench_families.py [--rows 16] [--shots 32] [--repeats 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_result  # noqa: E402

from mlflow_tabcons.members.batching import pad  # noqa: E402
from mlflow_tabcons.members.classifier import LoraSettings  # noqa: E402
from mlflow_tabcons.members.training import TrainSettings  # noqa: E402
from mlflow_tabcons.runtime import configure_threads  # noqa: E402
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402
from mlflow_tabcons.tracking.prepared import prepare_data  # noqa: E402
from mlflow_tabcons.tracking.training_job import build_trainer  # noqa: E402

MODELS = ("minilm", "smollm2")


def setup(model: str, rows: int, shots: int):
    train = TrainSettings(epochs=1, lora=LoraSettings(layers=3))
    config = TrainingConfig(data="credit-g", model=model, shots=shots, eval_rows=rows, train=train, register=None, recipe="fixed")
    data = prepare_data(config)
    trainer = build_trainer(config, data, "cpu", validate=False)
    return data, trainer, trainer.new_classifier(0).eval()


@torch.inference_mode()
def seconds_per_row(classifier, input_ids) -> float:
    ids, mask = pad(input_ids)
    started = time.perf_counter()
    classifier(ids, mask)
    return (time.perf_counter() - started) / len(input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "families.json"))
    args = parser.parse_args()
    configure_threads()
    parts = {model: setup(model, args.rows, args.shots) for model in MODELS}
    forward = {model: [] for model in MODELS}
    epoch = {model: [] for model in MODELS}
    for _ in range(args.repeats):
        for model, (data, trainer, classifier) in parts.items():
            forward[model].append(seconds_per_row(classifier, data.evaluation.input_ids))
            started = time.perf_counter()
            trainer.train_member(0)
            epoch[model].append((time.perf_counter() - started) / len(data.train))
    result = {
        "machine": machine(),
        "settings": vars(args),
        "tokens_per_row": {m: float(np.mean([len(r) for r in parts[m][0].evaluation.input_ids])) for m in MODELS},
        "seconds_per_full_forward_row": {m: float(np.median(forward[m])) for m in MODELS},
        "seconds_per_training_row_epoch_top3_lora": {m: float(np.median(epoch[m])) for m in MODELS},
    }
    result["ratio_forward_smollm2_over_minilm"] = (
        result["seconds_per_full_forward_row"]["smollm2"] / result["seconds_per_full_forward_row"]["minilm"]
    )
    result["ratio_training_smollm2_over_minilm"] = (
        result["seconds_per_training_row_epoch_top3_lora"]["smollm2"] / result["seconds_per_training_row_epoch_top3_lora"]["minilm"]
    )
    print(write_result(result, args.out).read_text())


if __name__ == "__main__":
    main()
