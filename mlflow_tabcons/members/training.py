"""Fine-tuning a seed ensemble of LoRA members (docs/method.md, "Ground truth").

``EnsembleTrainer`` holds what the members share: the tokenized rows, the
frozen base encoder and, when LoRA wraps only the top layers, the output of
the frozen layers below them, computed once for every row and reused by every
epoch of every member. Members differ in seed: LoRA and head initialization,
data order, dropout, and optionally which training rows they see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mlflow_tabcons.members.dropout import fast_dropout
from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int
from mlflow_tabcons.members.classifier import LoraSettings, TabularClassifier, build_classifier, with_attention_dropout

RESAMPLING = ("none", "bootstrap", "subsample")
CLASS_PRIORS = ("data", "uniform")
TRAIN_PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one member; every member of an ensemble shares them."""

    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 1e-3
    head_learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    class_weight: str = "balanced"
    # which class frequencies the trained member's probabilities assume; see adjust_class_prior
    class_prior: str = "data"
    max_length: int = 256
    pooling: str = "mean"
    head_dropout: float = 0.1
    # None keeps the checkpoint's value; 0 keeps SDPA on its fused kernel (see with_attention_dropout)
    attention_dropout: float | None = 0.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    resample: str = "none"
    subsample: float = 0.8
    cache_prefix: bool = True
    # bfloat16: forward and backward under autocast, weights and optimizer state stay float32
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1, maximum=1000)
        check_int("batch_size", self.batch_size, minimum=1, maximum=4096)
        check_float("learning_rate", self.learning_rate, low=0.0, high=1.0, low_open=True)
        check_float("head_learning_rate", self.head_learning_rate, low=0.0, high=1.0, low_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        check_choice("class_weight", self.class_weight, ("balanced", "none"))
        check_choice("class_prior", self.class_prior, CLASS_PRIORS)
        check_int("max_length", self.max_length, minimum=8, maximum=8192)
        check_choice("resample", self.resample, RESAMPLING)
        check_choice("precision", self.precision, TRAIN_PRECISIONS)
        check_float("subsample", self.subsample, low=0.0, high=1.0, low_open=True)
        if self.attention_dropout is not None:
            check_float("attention_dropout", self.attention_dropout, low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class EncodedRows:
    """Token ids of serialized rows (unpadded) and their class ids (-1 where unknown)."""

    input_ids: list[torch.Tensor]
    labels: np.ndarray
    value_masks: list[torch.Tensor] | None = None  # per row, which tokens spell its values (with value spans)

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> EncodedRows:
        masks = None if self.value_masks is None else [self.value_masks[i] for i in indices]
        return EncodedRows([self.input_ids[i] for i in indices], self.labels[list(indices)], masks)


def encode(
    tokenizer,
    texts: Sequence[str],
    labels: np.ndarray | None,
    max_length: int,
    value_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> EncodedRows:
    """Token ids (and, given the serializer's value spans, which tokens overlap a value)."""
    if value_spans is not None and not getattr(tokenizer, "is_fast", False):
        raise TabconsInputError("value-token masks need a fast tokenizer (character offsets); this model's tokenizer has none")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=value_spans is not None)
    ids = encoded["input_ids"]
    labels = np.full(len(ids), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    masks = None
    if value_spans is not None:
        masks = [_overlaps(offsets, spans) for offsets, spans in zip(encoded["offset_mapping"], value_spans)]
    return EncodedRows([torch.tensor(row, dtype=torch.long) for row in ids], labels, masks)


def _overlaps(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Tokens whose characters overlap one of ``spans`` (special tokens have empty offsets)."""
    starts = torch.tensor([start for start, _ in offsets])[:, None]
    ends = torch.tensor([end for _, end in offsets])[:, None]
    if not spans:
        return torch.zeros(len(offsets), dtype=torch.bool)
    span = torch.tensor(list(spans))
    hit = (starts < span[None, :, 1]) & (ends > span[None, :, 0]) & (ends > starts)
    return hit.any(dim=1)


def pad(rows: Sequence[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (ids) or 2-D (hidden states) rows; return the batch and its attention mask."""
    length = max(row.shape[0] for row in rows)
    batch = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return batch, mask


@dataclass
class Member:
    """One fine-tuned model of the ensemble and how its training went."""

    seed: int
    classifier: TabularClassifier
    history: list[dict[str, float]]
    train_rows: np.ndarray


def balanced_class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@torch.no_grad()
def adjust_class_prior(head: nn.Linear, labels: np.ndarray, num_labels: int, class_weight: str, class_prior: str) -> None:
    """Move the head's bias from the prior the loss trained for to the prior asked for.

    Balanced class weights keep few-shot members from collapsing onto the
    majority class, but they train the head for a uniform class prior, so its
    argmax trades accuracy for balanced accuracy. Adding log(prior) to the
    bias afterwards (logit adjustment, Menon et al. 2021) makes the
    probabilities estimate the data's class frequencies again ("data"), and
    subtracting it does the reverse for an unweighted loss ("uniform").
    """
    trained_for = "uniform" if class_weight == "balanced" else "data"
    if trained_for == class_prior:
        return
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    log_prior = torch.tensor(np.log(np.maximum(counts, 0.5) / counts.sum()), dtype=head.bias.dtype, device=head.bias.device)
    head.bias += log_prior if class_prior == "data" else -log_prior


class EnsembleTrainer:
    """Trains members that share a base encoder, tokenized rows and frozen-prefix cache."""

    def __init__(
        self,
        base_encoder: nn.Module,
        num_labels: int,
        settings: TrainSettings,
        train: EncodedRows,
        validation: EncodedRows | None = None,
        *,
        device: str = "cpu",
    ) -> None:
        if len(train) == 0:
            raise TabconsInputError("no training rows")
        if np.any(train.labels < 0):
            raise TabconsInputError("every training row needs a label")
        self.base_encoder = with_attention_dropout(base_encoder, settings.attention_dropout).to(device).eval()
        for parameter in self.base_encoder.parameters():
            parameter.requires_grad_(False)
        self.num_labels = num_labels
        self.settings = settings
        self.train = train
        self.validation = validation
        self.device = device
        probe = TabularClassifier(self.base_encoder, num_labels, pooling=settings.pooling)
        self.depth = probe.prefix_layers(settings.lora.layers) if settings.cache_prefix else 0
        self._train_prefix = self._prefix(probe, train) if self.depth else None
        self._validation_prefix = self._prefix(probe, validation) if self.depth and validation else None

    @torch.inference_mode()
    def _prefix(self, classifier: TabularClassifier, rows: EncodedRows, batch_size: int = 64) -> list[torch.Tensor]:
        """Per row: hidden states after the frozen layers, unpadded, on the CPU."""
        out: list[torch.Tensor] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows.input_ids[start : start + batch_size]
            ids, mask = pad(chunk)
            hidden = classifier.frozen_prefix(ids.to(self.device), mask.to(self.device), self.depth).cpu()
            out.extend(hidden[i, : len(row)].clone() for i, row in enumerate(chunk))
        return out

    def _logits(
        self, classifier: TabularClassifier, rows: EncodedRows, prefix: list[torch.Tensor] | None, index: np.ndarray
    ) -> torch.Tensor:
        if prefix is not None:
            hidden, mask = pad([prefix[i] for i in index])
            return classifier.logits_from_prefix(hidden.to(self.device), mask.to(self.device), self.depth)
        ids, mask = pad([rows.input_ids[i] for i in index])
        return classifier(ids.to(self.device), mask.to(self.device))

    def _member_rows(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.train)
        if self.settings.resample == "bootstrap":
            return rng.integers(0, n, size=n)
        if self.settings.resample == "subsample":
            return np.sort(rng.choice(n, size=max(self.num_labels, int(round(self.settings.subsample * n))), replace=False))
        return np.arange(n)

    @contextmanager
    def _training_kernels(self, classifier: TabularClassifier, rng: np.random.Generator) -> Iterator[None]:
        """Faster CPU kernels for what only training runs: dropout masks and, in bfloat16, attention.

        PyTorch's fused SDPA kernel has a slow bfloat16 backward on the CPU: 22.7 ms
        against 4.4 ms for eager attention (16 rows x 65 tokens x 12 heads, forward
        and backward); in float32 SDPA stays ahead (9.8 against 14.8 ms). Both
        switches are undone when training ends.
        """
        with ExitStack() as stack:
            if torch.device(self.device).type == "cpu":
                stack.enter_context(fast_dropout(classifier, rng.spawn(1)[0]))
                if self.settings.precision == "bfloat16":
                    stack.enter_context(classifier.attention("eager"))
            yield

    def train_member(self, seed: int, *, on_epoch: Callable[[dict[str, float]], bool | None] | None = None) -> Member:
        """Fine-tune one member; ``on_epoch`` receives each epoch's loss and validation scores.

        ``on_epoch`` returning True stops training after that epoch (early stopping).
        """
        settings = self.settings
        rng = np.random.default_rng(seed)
        classifier = build_classifier(
            self.base_encoder,
            self.num_labels,
            lora=settings.lora,
            seed=seed,
            pooling=settings.pooling,
            head_dropout=settings.head_dropout,
        ).to(self.device)
        torch.manual_seed(seed)
        rows = self._member_rows(rng)
        adapter = [p for n, p in classifier.named_parameters() if p.requires_grad and not n.startswith("head.")]
        optimizer = torch.optim.AdamW(
            [
                {"params": adapter, "lr": settings.learning_rate},
                {"params": list(classifier.head.parameters()), "lr": settings.head_learning_rate},
            ],
            weight_decay=settings.weight_decay,
        )
        steps = settings.epochs * math.ceil(len(rows) / settings.batch_size)
        warmup = max(1, int(settings.warmup * steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
        )
        weights = None
        if settings.class_weight == "balanced":
            weights = balanced_class_weights(self.train.labels[rows], self.num_labels).to(self.device)
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        labels = torch.from_numpy(self.train.labels.copy())
        autocast = torch.autocast(
            torch.device(self.device).type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16"
        )
        progress = tqdm(total=steps, desc=f"member seed={seed}", unit="step", leave=False, disable=None)

        def step(index: np.ndarray) -> float:
            """One optimizer step on the rows ``index``; returns their summed loss."""
            with autocast:
                logits = self._logits(classifier, self.train, self._train_prefix, index)
            loss = loss_fn(logits.float(), labels[index].to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update(1)
            return loss.item() * len(index)

        history: list[dict[str, float]] = []
        with self._training_kernels(classifier, rng):
            for epoch in range(1, settings.epochs + 1):
                classifier.train()
                order = rng.permutation(rows)
                batches = range(0, len(order), settings.batch_size)
                total = sum(step(order[start : start + settings.batch_size]) for start in batches)
                record = {"epoch": float(epoch), "train_loss": total / len(order)}
                if self.validation is not None and len(self.validation):
                    probabilities = self.predict_proba(classifier, self.validation, self._validation_prefix)
                    record.update(_validation_scores(probabilities, self.validation.labels))
                history.append(record)
                if on_epoch is not None and on_epoch(record) is True:
                    break
        progress.close()
        adjust_class_prior(classifier.head, self.train.labels[rows], self.num_labels, settings.class_weight, settings.class_prior)
        classifier.eval()
        return Member(seed=seed, classifier=classifier, history=history, train_rows=rows)

    def prefix_for(self, rows: EncodedRows) -> list[torch.Tensor] | None:
        """The frozen-prefix cache for other rows (e.g. the evaluation set), shared by all members."""
        if not self.depth:
            return None
        return self._prefix(TabularClassifier(self.base_encoder, self.num_labels, pooling=self.settings.pooling), rows)

    @torch.inference_mode()
    def predict_proba(
        self,
        classifier: TabularClassifier,
        rows: EncodedRows,
        prefix: list[torch.Tensor] | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Class probabilities (n, C) of one member, in evaluation mode."""
        was_training = classifier.training
        classifier.eval()
        out = []
        for start in range(0, len(rows), batch_size):
            index = np.arange(start, min(start + batch_size, len(rows)))
            out.append(torch.softmax(self._logits(classifier, rows, prefix, index), dim=-1).float().cpu().numpy())
        classifier.train(was_training)
        return np.concatenate(out)


def _validation_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from mlflow_tabcons.metrics.classification import classification_scores, log_loss

    scores = {**classification_scores(labels, probabilities), "loss": log_loss(labels, probabilities)}
    return {f"val_{name}": value for name, value in scores.items()}
