"""SmolLM2 in bfloat16 against float32 on the CPU: seconds per member and per scored row, and what moves.

Where the CPU has bfloat16 matrix units (Intel AMX, AVX512-BF16), autocast
runs the matrix products several times faster. Measured in one process on the
same credit-g rows, float32 first then bfloat16, each as `tabcons train
--recipe fixed` trains a member (``--train-precision``) and as the scorer scores
a row at the default ``embeddings`` site (``--scorer-precision``, the float32
member's weights). Besides the seconds: the largest change in a row's
probability and consistency S, and how many certificates differ.

    python benchmarks/bench_precision.py [--model smollm2] [--shots 128] [--epochs 4] [--rows 4] [--k 128] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_families import prepared, scored_rows  # noqa: E402
from common import RESULTS, machine, write_result  # noqa: E402

from mlflow_tabcons.members.checkpoints import resolve_model_path  # noqa: E402
from mlflow_tabcons.members.classifier import load_base_model  # noqa: E402
from mlflow_tabcons.runtime import configure_threads  # noqa: E402
from mlflow_tabcons.tracking.training_job import build_trainer  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--shots", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "precision.json"))
    args = parser.parse_args()
    configure_threads()
    config, data = prepared(args.model, args)
    base = load_base_model(resolve_model_path(config.model))
    member_seconds, members = {}, {}
    for precision in PRECISIONS:
        settings = replace(config.train, precision=precision)
        trainer = build_trainer(replace(config, train=settings), data, "cpu", base=base, validate=False)
        started = time.perf_counter()
        members[precision] = trainer.train_member(0)
        member_seconds[precision] = time.perf_counter() - started
    rows = data.evaluation.input_ids
    scores, row_seconds = {}, {}
    for precision in PRECISIONS:
        scores[precision], row_seconds[precision] = scored_rows(config, members["float32"], rows, "embeddings", args.k, precision)
    plain, fast = scores["float32"], scores["bfloat16"]
    result = {
        "machine": machine(),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "tokens_per_row": float(np.mean([len(r) for r in rows])),
        "seconds_per_member": member_seconds,
        "seconds_per_scored_row": row_seconds,
        "speedup_bfloat16": {
            "member": member_seconds["float32"] / member_seconds["bfloat16"],
            "scored_row": row_seconds["float32"] / row_seconds["bfloat16"],
        },
        "max_abs_change": {
            "probability": float(np.abs(plain.probabilities - fast.probabilities).max()),
            "consistency": float(np.abs(plain.consistency - fast.consistency).max()),
        },
        "certificates_differing": int(np.sum(plain.certified != fast.certified)),
        "predictions_differing": int(np.sum(plain.predicted != fast.predicted)),
    }
    print(write_result(result, args.out).read_text())


if __name__ == "__main__":
    main()
