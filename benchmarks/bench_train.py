"""Ensemble training: the project's path versus a plain Hugging Face Trainer + PEFT loop.

Both train the same M seeds on the same few-shot rows for the same epochs with
the same LoRA settings (rank, alpha, dropout, modules, top layers), and are
scored on the same held-out rows. The baseline is what a careful user writes
first: AutoModelForSequenceClassification + get_peft_model + Trainer, rows in
TabLLM's text template, dynamic padding, the checkpoint's own dropout. The
project's path shares the tokenized rows and the frozen lower layers' output
across all epochs and seeds, reads the compact template, trains without
dropout on attention probabilities (``TrainSettings.attention_dropout``; pass
``--attention-dropout -1`` to keep the checkpoint's and see that lever's share)
and, by default, under bfloat16 autocast (``--precision float32`` for that
lever's share; the baseline keeps the Trainer's float32 default). On the CPU it
also draws its dropout masks from NumPy's PCG64 (``mlflow_tabcons.members.dropout``)
and, in bfloat16, runs eager attention, whose backward is faster there than
SDPA's fused kernel (``EnsembleTrainer._training_kernels``).
Members are interleaved (ours, theirs, ours, ...) so machine drift hits both;
CPU seconds are reported next to wall seconds, as they are less sensitive to
other load on a shared machine.

    python benchmarks/bench_train.py [--quick] [--precision P] [--attention-dropout P] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Clock, machine, write_result  # noqa: E402

from mlflow_tabcons.data.tables import few_shot, load_dataset, split_dataset, stratified_sample  # noqa: E402
from mlflow_tabcons.members.training import TRAIN_PRECISIONS, EnsembleTrainer, TrainSettings, encode  # noqa: E402
from mlflow_tabcons.metrics.classification import classification_scores  # noqa: E402
from mlflow_tabcons.members.classifier import load_base_model, load_tokenizer  # noqa: E402
from mlflow_tabcons.members.checkpoints import resolve_model_path
from mlflow_tabcons.data.serialize import RowSerializer  # noqa: E402


class _Rows(torch.utils.data.Dataset):
    def __init__(self, encodings: dict, labels: np.ndarray):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.encodings["input_ids"][i], "labels": int(self.labels[i])}


def train_baseline_member(model_path, tokenizer, texts, labels, eval_texts, settings, seed, num_labels):
    """One seed, the way the Hugging Face docs teach it."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    layers = model.config.num_hidden_layers
    lora = settings.lora
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=list(range(layers - lora.layers, layers)) if lora.layers else None,
    )
    model = get_peft_model(model, config)
    train = _Rows(tokenizer(texts, truncation=True, max_length=settings.max_length), labels)
    steps = settings.epochs * -(-len(texts) // settings.batch_size)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            warmup_steps=max(1, int(settings.warmup * steps)),
            lr_scheduler_type="linear",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
        )
        Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)).train()
    model.eval()
    encoded = tokenizer(eval_texts, truncation=True, max_length=settings.max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return torch.softmax(model(**encoded).logits, dim=-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke-test configuration (seconds, not minutes)")
    parser.add_argument("--data", default="diabetes")
    parser.add_argument("--attention-dropout", type=float, default=TrainSettings().attention_dropout,
                        help="the project's path; -1 keeps the checkpoint's value")
    parser.add_argument("--precision", choices=TRAIN_PRECISIONS, default="bfloat16",
                        help="the project's path (bfloat16 autocast pays where the CPU has bfloat16 matrix units)")
    parser.add_argument("--seeds", type=int, help="ensemble size M (default 3, quick 2)")
    parser.add_argument("--out", default=str(RESULTS / "training.json"))
    args = parser.parse_args()
    shots, epochs, seeds, eval_rows = (32, 1, 2, 40) if args.quick else (128, 8, 3, 150)
    seeds = args.seeds or seeds

    dataset = load_dataset(args.data)
    split = split_dataset(dataset, seed=0)
    train_frame = few_shot(split.train, dataset.target, shots, seed=0)
    eval_frame = stratified_sample(split.test, dataset.target, eval_rows, seed=0, what="eval_rows")
    model_path = resolve_model_path("minilm")
    tokenizer = load_tokenizer(model_path)
    settings = TrainSettings(epochs=epochs, attention_dropout=None if args.attention_dropout < 0 else args.attention_dropout,
                             precision=args.precision).for_head("linear")  # MiniLM's linear head, as the baseline trains it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    labels, eval_labels = dataset.encode_labels(train_frame), dataset.encode_labels(eval_frame)
    ours_serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, "compact")
    plain_serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, "text")
    plain_texts, plain_eval = plain_serializer.serialize_frame(train_frame), plain_serializer.serialize_frame(eval_frame)

    clock = Clock()
    base = load_base_model(model_path)
    train_rows = encode(tokenizer, ours_serializer.serialize_frame(train_frame), labels, settings.max_length)
    eval_encoded = encode(tokenizer, ours_serializer.serialize_frame(eval_frame), eval_labels, settings.max_length)
    trainer = EnsembleTrainer(base, len(dataset.labels), settings, train_rows, device=device)
    eval_prefix = trainer.prefix_for(eval_encoded)
    ours_times = [clock.lap()]
    baseline_times, ours_scores, baseline_scores = [], [], []
    for seed in range(seeds):
        clock = Clock()
        member = trainer.train_member(seed)
        probabilities = trainer.predict_proba(member.classifier, eval_encoded, eval_prefix)
        ours_times.append(clock.lap())
        ours_scores.append(classification_scores(eval_labels, probabilities))

        clock = Clock()
        probabilities = train_baseline_member(
            model_path, tokenizer, plain_texts, labels, plain_eval, settings, seed, len(dataset.labels)
        )
        baseline_times.append(clock.lap())
        baseline_scores.append(classification_scores(eval_labels, probabilities))
        print(f"seed {seed}: ours {ours_times[-1][0]:.1f}s acc {ours_scores[-1]['accuracy']:.3f} | "
              f"baseline {baseline_times[-1][0]:.1f}s acc {baseline_scores[-1]['accuracy']:.3f}", flush=True)

    def mean(scores, key):
        return float(np.mean([s[key] for s in scores]))

    tokens = {name: float(np.mean([len(ids) for ids in tokenizer(texts)["input_ids"]]))
              for name, texts in (("ours", ours_serializer.serialize_frame(train_frame)), ("baseline", plain_texts))}
    result = {
        "benchmark": "ensemble training",
        "machine": machine(),
        "config": {"data": args.data, "shots": shots, "epochs": epochs, "seeds": seeds, "eval_rows": eval_rows,
                   "lora": {"rank": settings.lora.rank, "alpha": settings.lora.alpha,
                            "modules": list(settings.lora.target_modules), "top_layers": settings.lora.layers},
                   "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
                   "tokens_per_row": tokens},
        "device": device,
        "attention_dropout_ours": settings.attention_dropout,
        "precision_ours": settings.precision,
        "class_prior_ours": settings.class_prior,
        "seconds_ours": float(sum(wall for wall, _ in ours_times)),
        "seconds_ours_shared_setup": ours_times[0][0],
        "seconds_baseline": float(sum(wall for wall, _ in baseline_times)),
        "seconds_per_member_ours": [wall for wall, _ in ours_times[1:]],
        "seconds_per_member_baseline": [wall for wall, _ in baseline_times],
        "median_member_seconds_ours": float(np.median([wall for wall, _ in ours_times[1:]])),
        "median_member_seconds_baseline": float(np.median([wall for wall, _ in baseline_times])),
        "speedup": float(sum(wall for wall, _ in baseline_times) / sum(wall for wall, _ in ours_times)),
        "cpu_seconds_ours": float(sum(cpu for _, cpu in ours_times)),
        "cpu_seconds_baseline": float(sum(cpu for _, cpu in baseline_times)),
        "cpu_speedup": float(sum(cpu for _, cpu in baseline_times) / sum(cpu for _, cpu in ours_times)),
        "accuracy_ours": mean(ours_scores, "accuracy"),
        "accuracy_baseline": mean(baseline_scores, "accuracy"),
        "balanced_accuracy_ours": mean(ours_scores, "balanced_accuracy"),
        "balanced_accuracy_baseline": mean(baseline_scores, "balanced_accuracy"),
        "majority_rate": float(np.bincount(eval_labels).max() / len(eval_labels)),
    }
    path = write_result(result, args.out)
    print(f"speedup {result['speedup']:.2f}x (CPU time {result['cpu_speedup']:.2f}x), accuracy ours {result['accuracy_ours']:.3f} "
          f"vs baseline {result['accuracy_baseline']:.3f} -> {path}")


if __name__ == "__main__":
    main()
