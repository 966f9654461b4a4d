"""Certified scoring: the project's path versus what a careful user writes first.

The baseline scores one row at a time: all k_max neighbours of the row as one
batch at the row's own token length, PyTorch eager fp32, no early stop, then
the bound on all k_max samples. The project's path packs the neighbours of many
rows into token-budgeted batches and stops a row's sampling once the
anytime-valid betting bound has decided its certificate.

Both draw the very same neighbours (the project's deterministic per-row,
per-index seeding) and compute the same bound, so `decisions_agree` measures
whether the fast path changes any certificate, not Monte Carlo luck.

    python benchmarks/bench_scoring.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Clock, encoder_flops, machine, peak_matmul_gflops, write_result  # noqa: E402

from mlflow_tabcons.bounds import lower_confidence_bound  # noqa: E402
from mlflow_tabcons.consistency import (  # noqa: E402
    ConsistencyScorer,
    ScorerSettings,
    TorchBackend,
    neighbour_directions,
    neighbourhood_radius,
    row_key,
)
from mlflow_tabcons.data import few_shot, load_dataset, split_dataset, stratified_sample  # noqa: E402
from mlflow_tabcons.finetune import EnsembleTrainer, TrainSettings, encode  # noqa: E402
from mlflow_tabcons.model import load_encoder, load_tokenizer, resolve_model_path  # noqa: E402
from mlflow_tabcons.serialize import RowSerializer  # noqa: E402


@torch.inference_mode()
def baseline_scores(
    classifier, rows: list[torch.Tensor], settings: ScorerSettings, device: str
) -> np.ndarray:
    """Plain loop: per row, one batch of all k neighbours at the row's own length; certified flags."""
    certified = []
    for ids in rows:
        embedding = classifier.embed(ids[None].to(device))[0]
        mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
        p0 = torch.softmax(classifier.logits_from_embeddings(embedding[None], mask), dim=-1)[0]
        c = int(p0.argmax())
        directions = neighbour_directions(row_key(settings.seed, ids), 0, settings.k, tuple(embedding.shape), settings.noise).to(device)
        neighbours = embedding[None] + neighbourhood_radius(embedding, settings) * directions
        g = torch.softmax(classifier.logits_from_embeddings(neighbours, mask.expand(settings.k, -1)), dim=-1)[:, c]
        z = (g - (p0[c] - g).abs()).cpu().numpy()[None].astype(np.float64)
        lcb = lower_confidence_bound(z, settings.alpha, settings.bound, variance_bound=settings.variance_bound)[0]
        certified.append(lcb > settings.tau)
    return np.array(certified)


def trained_member(dataset, shots: int, epochs: int, device: str):
    split = split_dataset(dataset, seed=0)
    model_path = resolve_model_path("minilm")
    tokenizer = load_tokenizer(model_path)
    serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, "compact")
    frame = few_shot(split.train, dataset.target, shots, seed=0)
    rows = encode(tokenizer, serializer.serialize_frame(frame), dataset.encode_labels(frame), 256)
    trainer = EnsembleTrainer(load_encoder(model_path), len(dataset.labels), TrainSettings(epochs=epochs), rows, device=device)
    return trainer.train_member(0).classifier.eval(), tokenizer, serializer, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke-test configuration")
    parser.add_argument("--data", default="credit-g")
    parser.add_argument("--sigma", type=float, default=ScorerSettings().sigma)
    parser.add_argument("--out", default=str(RESULTS / "scoring.json"))
    args = parser.parse_args()
    n_rows, k_max, shots, epochs = (8, 64, 32, 1) if args.quick else (60, 256, 256, 8)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = load_dataset(args.data)
    classifier, tokenizer, serializer, split = trained_member(dataset, shots, epochs, device)
    frame = stratified_sample(split.test, dataset.target, n_rows, seed=1, what="rows")
    rows = encode(tokenizer, serializer.serialize_frame(frame), None, 256).input_ids
    settings = ScorerSettings(k=k_max, sigma=args.sigma, bound="betting")
    fast = settings.with_overrides(early_stop=True)
    backend = TorchBackend(classifier, device)
    peak = peak_matmul_gflops()

    def ours():
        clock = Clock()
        scores = ConsistencyScorer(backend, fast).score(rows)
        return clock.lap(), scores

    # ours, baseline, ours: drift on a shared machine hits both sides alike
    (wall_first, cpu_first), scores = ours()
    clock = Clock()
    baseline_certified = baseline_scores(classifier, rows, settings, device)
    seconds_baseline, cpu_baseline = clock.lap()
    (wall_second, cpu_second), _ = ours()
    seconds_ours, cpu_ours = (wall_first + wall_second) / 2, (cpu_first + cpu_second) / 2

    lengths = np.array([len(ids) for ids in rows])
    flops_per_pass = np.array([encoder_flops(classifier.config, n) for n in lengths])
    passes_ours = scores.samples + 1
    passes_baseline = np.full(len(rows), k_max + 1)
    result = {
        "benchmark": "certified scoring",
        "machine": machine(),
        "config": {"data": args.data, "model": "minilm (LoRA fine-tuned, 1 member)", "shots": shots, "epochs": epochs,
                   "sigma": settings.sigma, "sigma_mode": settings.sigma_mode, "alpha": settings.alpha,
                   "tau": settings.tau, "bound": settings.bound, "mean_tokens": float(lengths.mean()),
                   "max_batch_tokens": settings.max_batch_tokens},
        "rows": len(rows),
        "k_max": k_max,
        "seconds_ours": seconds_ours,
        "seconds_baseline": seconds_baseline,
        "speedup": seconds_baseline / seconds_ours,
        "cpu_speedup": cpu_baseline / cpu_ours,
        "device": device,
        "decisions_agree": float(np.mean(scores.certified == baseline_certified)),
        "mean_neighbours_ours": float(scores.samples.mean()),
        "certified_fraction_ours": float(scores.certified.mean()),
        "certified_fraction_baseline": float(baseline_certified.mean()),
        "passes_per_s": float(passes_ours.sum() / seconds_ours),
        "baseline_passes_per_s": float(passes_baseline.sum() / seconds_baseline),
        "achieved_gflops": float((passes_ours * flops_per_pass).sum() / seconds_ours / 1e9),
        "baseline_gflops": float((passes_baseline * flops_per_pass).sum() / seconds_baseline / 1e9),
        "peak_gflops": peak,
    }
    path = write_result(result, args.out)
    print(f"speedup {result['speedup']:.2f}x, decisions agree {result['decisions_agree']:.3f}, "
          f"{result['achieved_gflops']:.1f} of {peak:.1f} GFLOP/s peak -> {path}")


if __name__ == "__main__":
    main()
