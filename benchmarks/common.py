"""What every benchmark shares: the machine's description, its measured matmul peak, result files.

Speed claims are ratios against a plain baseline measured in the same run,
never absolute thresholds: these machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


class Clock:
    """Wall and process-CPU seconds since creation; CPU time is steadier on a shared machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def peak_matmul_gflops(size: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """The matrix-multiply rate this process gets right now in ``dtype``: the roof for figures in that precision."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e9


def encoder_flops(config: Any, length: int) -> float:
    """Multiply-adds x 2 of one encoder forward pass over ``length`` real tokens."""
    d, layers = config.hidden_size, config.num_hidden_layers
    ffn = getattr(config, "intermediate_size", 4 * d)
    per_layer = 2 * length * (4 * d * d + 2 * d * ffn) + 4 * length * length * d
    return float(layers * per_layer)


def trained_member(dataset: Any, shots: int, epochs: int, device: str, cache: str | Path | None = None) -> tuple:
    """One LoRA member fine-tuned on ``shots`` compact-serialized rows: the model the scoring figures use.

    Returns (classifier, tokenizer, serializer, split); the classifier has its
    LoRA merged, as the flavor packages it. With ``cache``, a member trained
    before with the same data, shots and epochs is loaded from there instead.
    """
    from mlflow_tabcons.data.tables import few_shot, split_dataset
    from mlflow_tabcons.members.training import EnsembleTrainer, TrainSettings, encode
    from mlflow_tabcons.members.classifier import ClassifierSpec, load_classifier, load_base_model, load_tokenizer, save_classifier
    from mlflow_tabcons.members.checkpoints import resolve_model_path
    from mlflow_tabcons.data.serialize import RowSerializer

    split = split_dataset(dataset, seed=0)
    model_path = resolve_model_path("minilm")
    tokenizer = load_tokenizer(model_path)
    serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, "compact")
    with tempfile.TemporaryDirectory() as scratch:
        saved = Path(cache or scratch) / f"{dataset.name}-{shots}shots-{epochs}epochs"
        if not (saved / "classifier.json").exists():
            frame = few_shot(split.train, dataset.target, shots, seed=0)
            rows = encode(tokenizer, serializer.serialize_frame(frame), dataset.encode_labels(frame), 256)
            trainer = EnsembleTrainer(load_base_model(model_path), len(dataset.labels), TrainSettings(epochs=epochs), rows, device=device)
            save_classifier(trainer.train_member(0).classifier, saved, ClassifierSpec(num_labels=len(dataset.labels)))
        return load_classifier(saved)[0].to(device), tokenizer, serializer, split


def eval_rows_available(data: str, wanted: int, target: str | None = None) -> int:
    """``wanted`` evaluation rows, or all the test split has where it has fewer (split seed 0, as the runs use)."""
    from mlflow_tabcons.data.tables import load_dataset, split_dataset

    return min(wanted, len(split_dataset(load_dataset(data, target), seed=0).test))


def write_result(payload: dict[str, Any], out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def update_result(section: str, payload: dict[str, Any], out: str | Path) -> Path:
    """Merge one section into a shared results file (several scripts fill `reliability.json`)."""
    path = Path(out)
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[section] = payload
    return write_result(existing, path)
