"""Fine-tuning a seed ensemble of LoRA members (docs/method.md, "Ground truth").

``EnsembleTrainer`` holds what the members share: the tokenized rows, the
frozen base model and, when LoRA wraps only the top layers, the output of
the frozen layers below them (members/prefix.py), computed once for every row
and reused by every epoch of every member. Members differ in seed: LoRA and head initialization,
data order, dropout, and optionally which training rows they see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mlflow_tabcons.members.dropout import fast_dropout
from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int
from mlflow_tabcons.members.batching import pad
from mlflow_tabcons.members.classifier import (
    HEADS,
    BaseModel,
    LoraSettings,
    TabularClassifier,
    build_classifier,
    resolve_head,
    with_attention_dropout,
)
from mlflow_tabcons.members.prefix import compute_prefix

RESAMPLING = ("none", "bootstrap", "subsample")
# Named class priors: the weight of the training rows' class frequencies in the members' probabilities.
CLASS_PRIORS = {"data": 1.0, "uniform": 0.0}
TRAIN_PRECISIONS = ("float32", "bfloat16")
# Learning rates (adapters, head) by head, for settings that give none. The verbalizer's answer rows start
# as the language model's own and move only at ten times the linear head's adapter rate: at 1e-3 / 3e-3
# SmolLM2's credit-g members ended with answer scores so flat that some answered the majority class for
# every row, at 1e-2 all of them beat it (docs/models.md).
DEFAULT_RATES = {"linear": (1e-3, 3e-3), "verbalizer": (1e-2, 1e-2)}


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one member; every member of an ensemble shares them."""

    epochs: int = 8
    # epochs the learning-rate schedule spans (None: ``epochs``). The recipe search stops a trial at its best
    # epoch of a longer schedule; members repeat that trajectory rather than squeeze the schedule into fewer
    # epochs (SmolLM2 on credit-g: 2 of 3 members beat the majority rate at epoch 4 of 8, none on a 4-epoch schedule).
    schedule_epochs: int | None = None
    batch_size: int = 16
    # None: the head's default (DEFAULT_RATES), filled in by for_head once the model's family is known
    learning_rate: float | None = None
    head_learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    class_weight: str = "balanced"
    # how much of the training rows' class frequencies the member's probabilities assume: 1 ("data")
    # the data's, 0 ("uniform") equal ones, in between a decision threshold between the two; see prior_shift
    class_prior: float = 1.0
    # each member chooses its class-prior weight on the validation rows (best_class_prior); class_prior wins ties
    tune_class_prior: bool = True
    max_length: int = 256
    # auto: the verbalizer for generative models, a linear head for encoders
    head: str = "auto"
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
        if self.schedule_epochs is not None:
            check_int("schedule_epochs", self.schedule_epochs, minimum=self.epochs, maximum=1000)
        check_int("batch_size", self.batch_size, minimum=1, maximum=4096)
        for name in ("learning_rate", "head_learning_rate"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), low=0.0, high=1.0, low_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        check_choice("class_weight", self.class_weight, ("balanced", "none"))
        object.__setattr__(self, "class_prior", class_prior_weight(self.class_prior))
        if not isinstance(self.tune_class_prior, (bool, np.bool_)):
            raise TabconsInputError(f"tune_class_prior must be true or false, got {self.tune_class_prior!r}")
        check_choice("head", self.head, HEADS)
        check_int("max_length", self.max_length, minimum=8, maximum=8192)
        check_choice("resample", self.resample, RESAMPLING)
        check_choice("precision", self.precision, TRAIN_PRECISIONS)
        check_float("subsample", self.subsample, low=0.0, high=1.0, low_open=True)
        if self.attention_dropout is not None:
            check_float("attention_dropout", self.attention_dropout, low=0.0, high=1.0, high_open=True)

    def for_head(self, head: str) -> TrainSettings:
        """These settings with ``head``'s default learning rates (``DEFAULT_RATES``) wherever none was given."""
        rate, head_rate = DEFAULT_RATES[head]
        return replace(
            self,
            learning_rate=rate if self.learning_rate is None else self.learning_rate,
            head_learning_rate=head_rate if self.head_learning_rate is None else self.head_learning_rate,
        )


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


@dataclass
class Member:
    """One fine-tuned model of the ensemble and how its training went."""

    seed: int
    classifier: TabularClassifier
    history: list[dict[str, float]]
    train_rows: np.ndarray
    class_prior: float  # the weight of the training rows' class prior folded into the head (see prior_shift)


def balanced_class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def class_prior_weight(value: str | float) -> float:
    """A class prior as the weight of the data's class frequencies: "data" is 1, "uniform" 0, or a number in [0, 1]."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in CLASS_PRIORS:
            return CLASS_PRIORS[name]
        try:
            value = float(name)
        except ValueError:
            raise TabconsInputError(f"class_prior must be one of {sorted(CLASS_PRIORS)} or a number in [0, 1], got {value!r}") from None
    return check_float("class_prior", value, low=0.0, high=1.0)


def prior_shift(labels: np.ndarray, num_labels: int, class_weight: str, class_prior: float) -> np.ndarray:
    """What to add to a member's logits so that its probabilities assume ``class_prior`` (logit adjustment).

    Balanced class weights keep few-shot members from collapsing onto the
    majority class, but they train for a uniform class prior, so the argmax
    trades accuracy for balanced accuracy. Adding log(prior) (Menon et al.
    2021) makes the probabilities estimate the data's class frequencies again;
    a fraction of it moves the decision threshold part of the way, which is
    what each member tunes on the validation rows (``best_class_prior``).
    """
    return (class_prior - _trained_for(class_weight)) * _log_class_frequencies(labels, num_labels)


def _trained_for(class_weight: str) -> float:
    """The class-prior weight the loss trains for: balanced weights train for a uniform prior."""
    return CLASS_PRIORS["uniform" if class_weight == "balanced" else "data"]


def _log_class_frequencies(labels: np.ndarray, num_labels: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return np.log(np.maximum(counts, 0.5) / counts.sum())


# Class-prior weights a member weighs on the validation rows: 1 the data's class frequencies, 0 uniform.
PRIOR_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)


def best_class_prior(
    probabilities: np.ndarray,
    labels: np.ndarray,
    train_labels: np.ndarray,
    class_weight: str,
    configured: float,
    *,
    whole_line: bool = True,
) -> float:
    """The class-prior weight whose decisions are most accurate on held-out rows (``probabilities`` as trained).

    The weight is a decision threshold, fitted to each member's own logit scale: one member of an
    ensemble can end training with logits so flat that the full data prior sends every row to the
    majority class while its ranking is as good as its peers' (docs/recipe.md). Between two classes a
    verbalizer member's answer scores can also sit beyond every weight in [0, 1] (the base model leans to
    one label word), so there the weight that cuts between any two neighbouring validation rows is a
    candidate too (``line_weights``). A tie keeps ``configured``, then the weights of ``PRIOR_WEIGHTS`` in
    order, then the weight nearest ``configured``: the threshold leaves the grid only for decisions that
    are strictly more accurate on the held-out rows. ``whole_line=False`` weighs the grid alone
    (``benchmarks/class_prior_rules.py`` compares the two on the same members).
    """
    log_p = np.log(np.maximum(probabilities, 1e-12))
    num_labels = probabilities.shape[1]
    line = []
    if whole_line:
        line = line_weights(log_p, _log_class_frequencies(train_labels, num_labels), _trained_for(class_weight))
    candidates = (configured, *(w for w in PRIOR_WEIGHTS if w != configured), *sorted(line, key=lambda w: abs(w - configured)))
    accuracy = {
        weight: float(np.mean(np.argmax(log_p + prior_shift(train_labels, num_labels, class_weight, weight), axis=1) == labels))
        for weight in candidates
    }
    best = max(accuracy.values())
    return next(weight for weight in candidates if accuracy[weight] == best)


def line_weights(log_p: np.ndarray, log_prior: np.ndarray, trained_for: float) -> list[float]:
    """For two classes, the weights whose thresholds cut between neighbouring answer-score differences of
    the rows ``log_p`` and beyond both ends. None for three classes or more, nor where the training rows'
    classes are balanced (a weight then moves nothing)."""
    slope = log_prior[-1] - log_prior[0]
    if log_p.shape[1] != 2 or abs(slope) < 1e-9:
        return []
    differences = np.unique(log_p[:, 1] - log_p[:, 0])
    cuts = np.concatenate([[differences[0] - 1.0], (differences[1:] + differences[:-1]) / 2, [differences[-1] + 1.0]])
    # class 1 wins where difference + (weight - trained_for) * slope > 0: the threshold sits at the cut for this weight
    return [float(trained_for - cut / slope) for cut in cuts]


@torch.no_grad()
def adjust_class_prior(head: nn.Linear, labels: np.ndarray, num_labels: int, class_weight: str, class_prior: str | float) -> None:
    """Move the head's bias from the prior the loss trained for to ``class_prior`` (see ``prior_shift``): a name
    or a weight, which a member's tuning (``best_class_prior``) may put outside [0, 1]."""
    weight = class_prior_weight(class_prior) if isinstance(class_prior, str) else float(class_prior)
    shift = prior_shift(labels, num_labels, class_weight, weight)
    head.bias += torch.tensor(shift, dtype=head.bias.dtype, device=head.bias.device)


class EnsembleTrainer:
    """Trains members that share a base model, tokenized rows and frozen-prefix cache.

    ``answer_ids`` are the verbalizer's answer tokens, one per class (see
    ``answer_token_ids``); the linear head needs none.
    """

    def __init__(
        self,
        base: BaseModel,
        num_labels: int,
        settings: TrainSettings,
        train: EncodedRows,
        validation: EncodedRows | None = None,
        *,
        device: str = "cpu",
        answer_ids: Sequence[int] | None = None,
    ) -> None:
        if len(train) == 0:
            raise TabconsInputError("no training rows")
        if np.any(train.labels < 0):
            raise TabconsInputError("every training row needs a label")
        backbone = with_attention_dropout(base.backbone, settings.attention_dropout).to(device).eval()
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        self.base = replace(base, backbone=backbone)
        self.head = resolve_head(settings.head, base.family)
        self.answer_ids = list(answer_ids) if answer_ids is not None and self.head == "verbalizer" else None
        self.num_labels = num_labels
        self.settings = settings.for_head(self.head)
        self.train = train
        self.validation = validation
        self.device = device
        self.depth = self._probe().prefix_layers(settings.lora.layers) if settings.cache_prefix else 0
        self._train_prefix = self.prefix_for(train)
        self._validation_prefix = self.prefix_for(validation) if validation else None

    def _probe(self) -> TabularClassifier:
        """The base model without adapters, for the frozen layers' output."""
        return TabularClassifier(self.base.backbone, self.num_labels, family=self.base.family, pooling=self.settings.pooling)

    def new_classifier(self, seed: int) -> TabularClassifier:
        """An untrained member with this ensemble's settings, seeded LoRA and head."""
        settings = self.settings
        return build_classifier(
            self.base,
            self.num_labels,
            lora=settings.lora,
            seed=seed,
            pooling=settings.pooling,
            head_dropout=settings.head_dropout,
            head=self.head,
            answer_ids=self.answer_ids,
        ).to(self.device)

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

        ``on_epoch`` returning True stops training after that epoch (early stopping). With
        ``tune_class_prior`` and validation rows, the member's class-prior weight is chosen on them last.
        """
        settings = self.settings
        rng = np.random.default_rng(seed)
        classifier = self.new_classifier(seed)
        torch.manual_seed(seed)
        rows = self._member_rows(rng)
        adapter = [p for n, p in classifier.named_parameters() if p.requires_grad and not n.startswith("head.")]
        head = [p for p in classifier.head.parameters() if p.requires_grad]
        groups = [{"params": adapter, "lr": settings.learning_rate}, {"params": head, "lr": settings.head_learning_rate}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=settings.weight_decay)
        per_epoch = math.ceil(len(rows) / settings.batch_size)
        steps = settings.epochs * per_epoch
        scheduled = (settings.schedule_epochs or settings.epochs) * per_epoch
        warmup = max(1, int(settings.warmup * scheduled))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, max(0.0, (scheduled - step) / max(1, scheduled - warmup)))
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
                probabilities = None
                if self.validation is not None and len(self.validation):
                    probabilities = self.predict_proba(classifier, self.validation, self._validation_prefix)
                    record.update(_validation_scores(probabilities, self.validation.labels, settings.class_weight))
                history.append(record)
                if on_epoch is not None and on_epoch(record) is True:
                    break
        progress.close()
        prior = settings.class_prior
        if settings.tune_class_prior and probabilities is not None:
            prior = best_class_prior(probabilities, self.validation.labels, self.train.labels[rows], settings.class_weight, prior)
        adjust_class_prior(classifier.head, self.train.labels[rows], self.num_labels, settings.class_weight, prior)
        classifier.eval()
        return Member(seed=seed, classifier=classifier, history=history, train_rows=rows, class_prior=prior)

    def prefix_for(self, rows: EncodedRows) -> list[torch.Tensor] | None:
        """The frozen-prefix cache for any rows (training, the evaluation set), shared by all members."""
        if not self.depth:
            return None
        return compute_prefix(self._probe(), rows.input_ids, self.depth, device=self.device)

    def predict_validation(self, classifier: TabularClassifier) -> np.ndarray | None:
        """Class probabilities of the validation rows (None without any), from their frozen-prefix cache."""
        if self.validation is None or not len(self.validation):
            return None
        return self.predict_proba(classifier, self.validation, self._validation_prefix)

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


def _validation_scores(probabilities: np.ndarray, labels: np.ndarray, class_weight: str) -> dict[str, float]:
    """Accuracy, AUROC and the training objective on held-out rows: the loss weighted as training weighs it.

    A head trained with balanced weights predicts for a uniform class prior, so
    its plain log loss on imbalanced rows rises as it leaves that prior and
    bottoms out after an epoch or two: early stopping on it ended credit-g
    members (70/30) before they learned anything (docs/recipe.md).
    """
    from mlflow_tabcons.metrics.classification import classification_scores, log_loss

    weights = None
    if class_weight == "balanced":
        weights = balanced_class_weights(labels, probabilities.shape[1]).numpy()[labels]
    scores = {**classification_scores(labels, probabilities), "loss": log_loss(labels, probabilities, sample_weight=weights)}
    return {f"val_{name}": value for name, value in scores.items()}
