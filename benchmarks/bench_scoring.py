"""Certified scoring: the project's path versus what a careful user writes first.

The baseline scores one row at a time: all k_max neighbours of the row as one
batch at the row's own token length, PyTorch eager fp32, no early stop, then
the bound on all k_max samples. The project's path packs the neighbours of many
rows into token-budgeted batches, stops a row's sampling once the
anytime-valid betting bound has decided its certificate, and runs the passes
in bfloat16 (``--precision``; ``--backend onnx`` for ONNX Runtime). The same
early-stopping path in float32 runs too (``paths.ours_float32``), which splits
the speedup into its two levers and measures float32 efficiency on its own.
Both sides score the same LoRA-merged member, the form the flavor packages.

Both draw the very same neighbours (the project's deterministic per-row,
per-index seeding) and compute the same bound, so `decisions_agree` measures
whether the fast path changes any certificate, not Monte Carlo luck.

    python benchmarks/bench_scoring.py [--quick] [--repeats N] [--member-cache DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Clock, encoder_flops, machine, peak_matmul_gflops, trained_member, write_result  # noqa: E402

from mlflow_tabcons.scoring.bounds import lower_confidence_bound  # noqa: E402
from mlflow_tabcons.scoring.consistency import (  # noqa: E402
    PRECISIONS,
    ConsistencyScorer,
    ScorerSettings,
    TorchBackend,
    neighbour_directions,
    neighbourhood_radius,
    row_key,
)
from mlflow_tabcons.data.tables import load_dataset, stratified_sample  # noqa: E402
from mlflow_tabcons.members.training import encode  # noqa: E402


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


def ours_backend(classifier, kind: str, precision: str, device: str, scratch: Path):
    """The project's engine for the neighbour passes: PyTorch (float32 or bfloat16) or ONNX Runtime."""
    if kind == "torch":
        return TorchBackend(classifier, device, precision)
    from mlflow_tabcons.scoring.onnx import OnnxBackend, export_onnx

    export_onnx(classifier, scratch)
    return OnnxBackend(scratch)


def timed(function):
    clock = Clock()
    out = function()
    return clock.lap(), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke-test configuration")
    parser.add_argument("--data", default="diabetes")
    parser.add_argument("--sigma", type=float, default=ScorerSettings().sigma)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="the project's engine")
    parser.add_argument("--precision", choices=PRECISIONS, default="bfloat16", help="the project's PyTorch precision")
    parser.add_argument("--max-batch-tokens", type=int, default=ScorerSettings().max_batch_tokens)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both sides (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="ours-baseline-ours rounds; medians are reported")
    parser.add_argument("--member-cache", help="reuse a member trained earlier with the same settings (see common.py)")
    parser.add_argument("--rows", type=int, help="how many test rows to score (default 60, quick 8)")
    parser.add_argument("--out", default=str(RESULTS / "scoring.json"))
    args = parser.parse_args()
    n_rows, k_max, shots, epochs = (8, 64, 32, 1) if args.quick else (60, 256, 256, 8)
    n_rows = args.rows or n_rows
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = load_dataset(args.data)
    classifier, tokenizer, serializer, split = trained_member(dataset, shots, epochs, device, args.member_cache)
    frame = stratified_sample(split.test, dataset.target, n_rows, seed=1, what="rows")
    rows = encode(tokenizer, serializer.serialize_frame(frame), None, 256).input_ids
    settings = ScorerSettings(k=k_max, sigma=args.sigma, bound="betting", max_batch_tokens=args.max_batch_tokens)
    fast = settings.with_overrides(early_stop=True)
    precision = args.precision if args.backend == "torch" else "float32"
    with tempfile.TemporaryDirectory() as scratch:
        engines = {"ours": ours_backend(classifier, args.backend, precision, device, Path(scratch)),
                   "ours_float32": TorchBackend(classifier, device, "float32")}
        if args.backend == "torch" and precision == "float32":
            del engines["ours_float32"]  # the same path twice
        peaks = {name: peak_matmul_gflops(dtype=getattr(torch, name)) for name in {"float32", precision}}
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in [*engines, "baseline"]}
        scores = {}
        for _ in range(args.repeats):  # ours, baseline, ours: drift on a shared machine hits both sides alike
            for name, engine in engines.items():
                lap, scores[name] = timed(lambda: ConsistencyScorer(engine, fast).score(rows))
                timings[name].append(lap)
            lap, baseline_certified = timed(lambda: baseline_scores(classifier, rows, settings, device))
            timings["baseline"].append(lap)
            for name, engine in reversed(engines.items()):
                timings[name].append(timed(lambda: ConsistencyScorer(engine, fast).score(rows))[0])

    lengths = np.array([len(ids) for ids in rows])
    flops_per_pass = np.array([encoder_flops(classifier.config, n) for n in lengths])
    baseline_passes = np.full(len(rows), k_max + 1)
    wall = {name: float(np.median([w for w, _ in laps])) for name, laps in timings.items()}
    cpu = {name: float(np.median([c for _, c in laps])) for name, laps in timings.items()}

    def path_figures(name: str) -> dict[str, float]:
        passes = scores[name].samples + 1
        return {
            "seconds": wall[name],
            "speedup": wall["baseline"] / wall[name],
            "cpu_speedup": cpu["baseline"] / cpu[name],
            "decisions_agree": float(np.mean(scores[name].certified == baseline_certified)),
            "mean_neighbours": float(scores[name].samples.mean()),
            "certified_fraction": float(scores[name].certified.mean()),
            "passes_per_s": float(passes.sum() / wall[name]),
            "achieved_gflops": float((passes * flops_per_pass).sum() / wall[name] / 1e9),
        }

    ours = path_figures("ours")
    result = {
        "benchmark": "certified scoring",
        "machine": machine(),
        "config": {"data": args.data, "model": "minilm (LoRA fine-tuned and merged, 1 member)", "shots": shots,
                   "epochs": epochs, "sigma": settings.sigma, "sigma_mode": settings.sigma_mode, "alpha": settings.alpha,
                   "tau": settings.tau, "bound": settings.bound, "mean_tokens": float(lengths.mean()),
                   "max_batch_tokens": settings.max_batch_tokens, "backend": args.backend, "precision": precision,
                   "repeats": args.repeats,
                   "flops": "2 x multiply-adds of the encoder at each row's real token count (common.encoder_flops), "
                            "per forward pass actually run; padding in a batch is not counted"},
        "rows": len(rows),
        "k_max": k_max,
        "speedup": ours["speedup"],
        "decisions_agree": ours["decisions_agree"],
        "passes_per_s": ours["passes_per_s"],
        "baseline_passes_per_s": float(baseline_passes.sum() / wall["baseline"]),
        "achieved_gflops": ours["achieved_gflops"],
        "peak_gflops": peaks[precision],
        "peak_gflops_float32": peaks["float32"],
        "baseline_gflops": float((baseline_passes * flops_per_pass).sum() / wall["baseline"] / 1e9),
        "seconds_baseline": wall["baseline"],
        "certified_fraction_baseline": float(baseline_certified.mean()),
        "device": device,
        "paths": {name: path_figures(name) for name in engines},
        "seconds_all_runs": {name: [w for w, _ in laps] for name, laps in timings.items()},
    }
    path = write_result(result, args.out)
    for name, figures in result["paths"].items():
        print(f"{name}: speedup {figures['speedup']:.2f}x, decisions agree {figures['decisions_agree']:.3f}, "
              f"{figures['mean_neighbours']:.0f} neighbours/row, {figures['achieved_gflops']:.1f} GFLOP/s")
    print(f"peaks {peaks}; baseline {result['baseline_gflops']:.1f} GFLOP/s -> {path}")


if __name__ == "__main__":
    main()
