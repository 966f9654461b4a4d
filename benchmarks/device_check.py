"""Device check: SmolLM2 members per minute and neighbour forward passes per second on this machine.

On a GPU (the intended run): 10 SmolLM2 members on credit-g (128 shots) and
200 scored rows, both in bfloat16 autocast. Without a GPU it runs the same
code with tiny settings (`--members 2 --rows 4 --k 4 --epochs 1 --shots 16`)
so the script itself is exercised; those figures say nothing about a GPU.

    python benchmarks/device_check.py [--members 10] [--rows 200] [--k 64] [--epochs 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_result  # noqa: E402

from mlflow_tabcons.members.classifier import LoraSettings  # noqa: E402
from mlflow_tabcons.members.training import TrainSettings  # noqa: E402
from mlflow_tabcons.runtime import configure_threads, default_device  # noqa: E402
from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ScorerSettings, TorchBackend  # noqa: E402
from mlflow_tabcons.tracking.config import TrainingConfig  # noqa: E402
from mlflow_tabcons.tracking.prepared import prepare_data  # noqa: E402
from mlflow_tabcons.tracking.training_job import build_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--rows", type=int, default=200, help="evaluation rows scored by the first member")
    parser.add_argument("--k", type=int, default=64, help="neighbours per scored row")
    parser.add_argument("--shots", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lora-layers", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="scorer batch size in tokens (default: sized from the free GPU memory; 16,384 on the CPU)")
    parser.add_argument("--out", default=str(RESULTS / "device_check.json"))
    args = parser.parse_args()
    configure_threads()
    device = default_device()
    precision = "bfloat16" if device == "cuda" else "float32"
    train = TrainSettings(epochs=args.epochs, precision=precision, lora=LoraSettings(layers=args.lora_layers))
    scorer_settings = ScorerSettings(k=args.k, precision=precision, max_batch_tokens=args.max_batch_tokens)
    config = TrainingConfig(data="credit-g", model=args.model, shots=args.shots, seeds=max(2, args.members),
                            eval_rows=args.rows, train=train, scorer=scorer_settings, register=None, recipe="fixed")
    data = prepare_data(config)
    started = time.perf_counter()
    trainer = build_trainer(config, data, device, validate=False)  # members/minute without per-epoch validation
    seconds_setup = time.perf_counter() - started  # base model load and the training rows' frozen-prefix cache
    started = time.perf_counter()
    members = [trainer.train_member(seed) for seed in range(args.members)]
    seconds_members = time.perf_counter() - started
    scorer = ConsistencyScorer(TorchBackend(members[0].classifier, device, precision), scorer_settings)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    scores = scorer.score(data.evaluation.input_ids)
    seconds_score = time.perf_counter() - started
    passes = int(scores.samples.sum()) + len(scores.samples)  # neighbours plus the unperturbed pass per row
    result = {
        "machine": machine(),
        "device": device,
        "precision": precision,
        "settings": vars(args),
        "seconds_setup": seconds_setup,
        "seconds_members": seconds_members,
        "members_per_minute": 60 * len(members) / seconds_members,
        "seconds_score": seconds_score,
        "neighbour_passes": passes,
        "neighbour_passes_per_second": passes / seconds_score,
        "max_batch_tokens": args.max_batch_tokens or scorer.backend.token_budget(max(len(r) for r in data.evaluation.input_ids)),
        "mean_tokens_per_row": float(sum(len(r) for r in data.evaluation.input_ids) / len(data.evaluation)),
    }
    path = write_result(result, args.out)
    print(f"{device} ({precision}): {result['members_per_minute']:.2f} members/minute, "
          f"{result['neighbour_passes_per_second']:.1f} neighbour passes/second -> {path}")


if __name__ == "__main__":
    main()
