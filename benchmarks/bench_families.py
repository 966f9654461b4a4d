"""SmolLM2 (decoder, verbalizer) against MiniLM (encoder, linear head): seconds per member and per scored row.

Both run in this process on the same credit-g rows (compact template; the
decoder's rows end with "Answer:"), interleaved so machine drift hits both.
What a user waits for is measured whole: one member as `tabcons train
--recipe fixed` trains it (``--shots`` rows, ``--epochs`` epochs, LoRA on the
top 3 layers over the frozen-prefix cache) and one row as the scorer scores
it (k neighbour passes plus the row's own) at the default ``embeddings`` site,
which runs every layer, and at the ``hidden`` site, which runs only the
adapted layers. One full-depth forward pass per row is reported as the unit.

    python benchmarks/bench_families.py [--shots 128] [--epochs 8] [--rows 4] [--k 128] [--repeats 1] [--out PATH]
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
from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ScorerSettings  # noqa: E402
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402
from mlflow_tabcons.tracking.prepared import prepare_data  # noqa: E402
from mlflow_tabcons.tracking.training_job import build_trainer, reference_backend  # noqa: E402

MODELS = ("minilm", "smollm2")
SITES = ("embeddings", "hidden")


def prepared(model: str, args: argparse.Namespace):
    """The fixed-recipe configuration and its credit-g rows."""
    train = TrainSettings(epochs=args.epochs, lora=LoraSettings(layers=3))
    config = TrainingConfig(data="credit-g", model=model, shots=args.shots, eval_rows=args.rows, train=train,
                            register=None, recipe="fixed")
    return config, prepare_data(config)


def setup(model: str, args: argparse.Namespace):
    config, data = prepared(model, args)
    return config, data, build_trainer(config, data, "cpu", validate=False)


@torch.inference_mode()
def seconds_per_forward_row(classifier, input_ids) -> float:
    ids, mask = pad(input_ids)
    started = time.perf_counter()
    classifier(ids, mask)
    return (time.perf_counter() - started) / len(input_ids)


def scored_rows(config, member, input_ids, site: str, k: int, precision: str = "float32"):
    """The rows' scores as the scorer computes them, and the seconds per row."""
    scorer_settings = ScorerSettings(k=k, perturb=site, precision=precision)
    scorer = ConsistencyScorer(reference_backend(member, config.train, scorer_settings, "cpu"), scorer_settings)
    started = time.perf_counter()
    scores = scorer.score(input_ids)
    return scores, (time.perf_counter() - started) / len(input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "families.json"))
    args = parser.parse_args()
    configure_threads()
    parts = {model: setup(model, args) for model in MODELS}
    forward = {model: [] for model in MODELS}
    member_seconds = {model: [] for model in MODELS}
    scored = {model: {site: [] for site in SITES} for model in MODELS}
    for repeat in range(args.repeats):
        for model, (config, data, trainer) in parts.items():
            started = time.perf_counter()
            member = trainer.train_member(repeat)
            member_seconds[model].append(time.perf_counter() - started)
            forward[model].append(seconds_per_forward_row(member.classifier, data.evaluation.input_ids))
            for site in SITES:
                scored[model][site].append(scored_rows(config, member, data.evaluation.input_ids, site, args.k)[1])
    result = {
        "machine": machine(),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "tokens_per_row": {m: float(np.mean([len(r) for r in parts[m][1].evaluation.input_ids])) for m in MODELS},
        "seconds_per_full_forward_row": {m: float(np.median(forward[m])) for m in MODELS},
        "seconds_per_member": {m: float(np.median(member_seconds[m])) for m in MODELS},
        "seconds_per_scored_row": {m: {s: float(np.median(scored[m][s])) for s in SITES} for m in MODELS},
    }
    result["ratio_smollm2_over_minilm"] = {
        "full_forward_row": result["seconds_per_full_forward_row"]["smollm2"] / result["seconds_per_full_forward_row"]["minilm"],
        "member": result["seconds_per_member"]["smollm2"] / result["seconds_per_member"]["minilm"],
        **{f"scored_row_{s}": result["seconds_per_scored_row"]["smollm2"][s] / result["seconds_per_scored_row"]["minilm"][s]
           for s in SITES},
    }
    print(write_result(result, args.out).read_text())


if __name__ == "__main__":
    main()
