"""The packaged model: a classifier with everything it needs to read raw table rows and score itself.

``TabconsModel`` is what ``mlflow_tabcons.flavor.load_model`` returns and what
the pyfunc wraps: serializer and data dictionary, tokenizer, classifier, label
names, the scorer's settings and (once trained) the evidence computed at
training time. ``write``/``read`` put it on disk and back, offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ProbabilityBackend, ScorerSettings, TorchBackend
from mlflow_tabcons.errors import TabconsInputError, check_choice, check_int
from mlflow_tabcons.members.training import encode
from mlflow_tabcons.members.classifier import ClassifierSpec, TabularClassifier, load_classifier, load_tokenizer, save_classifier
from mlflow_tabcons.runtime import default_device
from mlflow_tabcons.data.serialize import RowSerializer, is_missing

BACKENDS = ("torch", "onnx")
# Neighbours per row a request may ask for: k forward passes per row is the cost of a request.
DEFAULT_MAX_K = 4096
PREDICT_PARAMS = ("k", "sigma", "alpha", "seed", "score")
CONFIG_FILE = "tabcons.json"
EVIDENCE_FILE = "evidence.json"
CLASSIFIER_DIR = "classifier"
TOKENIZER_DIR = "tokenizer"
ONNX_DIR = "onnx"


@dataclass
class TabconsModel:
    """A fine-tuned tabular classifier that answers with a prediction and its consistency certificate.

    ``required`` lists the feature columns that had no missing values in
    training: a request with a missing value there is refused, not guessed.
    """

    classifier: TabularClassifier
    spec: ClassifierSpec
    tokenizer: Any
    serializer: RowSerializer
    labels: list[Any]
    settings: ScorerSettings = field(default_factory=ScorerSettings)
    max_length: int = 256
    required: list[str] = field(default_factory=list)
    max_k: int = DEFAULT_MAX_K
    evidence: dict[str, Any] | None = None
    backend: ProbabilityBackend | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != self.spec.num_labels:
            raise TabconsInputError(f"{len(self.labels)} label names for a classifier with {self.spec.num_labels} classes")
        check_int("max_length", self.max_length, minimum=8)
        check_int("max_k", self.max_k, minimum=2)
        unknown = sorted(set(self.required) - set(self.serializer.columns))
        if unknown:
            raise TabconsInputError(f"required column(s) {unknown} are not feature columns {list(self.serializer.columns)}")
        if self.backend is None:
            depth = self.classifier.prefix_layers(self.spec.lora.get("layers"))  # the hidden site: input of the first LoRA layer
            self.backend = TorchBackend(self.classifier, default_device(), self.settings.precision, hidden_depth=depth)

    @property
    def columns(self) -> list[str]:
        return list(self.serializer.columns)

    def scorer(self, **overrides: Any) -> ConsistencyScorer:
        """The robustness scorer with the packaged settings, some replaced (validated)."""
        return ConsistencyScorer(self.backend, self.settings.with_overrides(**overrides))

    # -- prediction ---------------------------------------------------------
    def check_frame(self, frame: Any) -> pd.DataFrame:
        """The request table, refused with the reason when it cannot be answered faithfully."""
        if not isinstance(frame, pd.DataFrame):
            raise TabconsInputError(f"input must be a table (pandas DataFrame) with columns {self.columns}, got {type(frame).__name__}")
        if frame.empty:
            raise TabconsInputError("nothing to predict: the input has no rows")
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise TabconsInputError(f"input is missing column(s) {missing}; expected {self.columns}")
        for column in self.required:
            rows = [i for i, value in enumerate(frame[column].tolist()) if is_missing(value)]
            if rows:
                raise TabconsInputError(
                    f"column {column!r} has missing values in row(s) {rows[:10]}; it had none in training, "
                    "so the model cannot answer for these rows"
                )
        return frame

    def _scorer_for(self, k: Any, sigma: Any, alpha: Any, seed: Any) -> ConsistencyScorer:
        if k is not None:
            check_int("k", k, minimum=2)
            if k > self.max_k:
                raise TabconsInputError(f"k={k} is above this model's cap of {self.max_k} neighbours per row (max_k)")
        scorer = self.scorer(k=k, sigma=sigma, alpha=alpha, seed=seed)
        self._check_not_weaker(scorer.settings)
        return scorer

    def _check_not_weaker(self, asked: ScorerSettings) -> None:
        """A request may make ``certified`` stricter, never weaker than the packaged protocol.

        A larger alpha or a smaller sigma (the neighbours closer to the row) certifies
        rows the packaged settings would not; fewer neighbours only loosen the bound.
        """
        packaged = self.settings
        if asked.alpha > packaged.alpha:
            raise TabconsInputError(
                f"alpha={asked.alpha} is above the packaged alpha {packaged.alpha}: a request may not make 'certified' weaker"
            )
        if asked.sigma < packaged.sigma:
            raise TabconsInputError(
                f"sigma={asked.sigma} is below the packaged sigma {packaged.sigma}: a request may not make 'certified' weaker"
            )

    def predict(
        self,
        frame: pd.DataFrame,
        *,
        k: int | None = None,
        sigma: float | None = None,
        alpha: float | None = None,
        seed: int | None = None,
        score: bool = True,
    ) -> pd.DataFrame:
        """One record per row: prediction, probability, consistency, consistency_lcb, certified.

        ``score=False`` skips the k neighbour passes: consistency and its bound
        are None (JSON null when served) and ``certified`` is false (nothing was certified).
        """
        if not isinstance(score, (bool, np.bool_)):
            raise TabconsInputError(f"score must be true or false, got {score!r}")
        scorer = self._scorer_for(k, sigma, alpha, seed)
        frame = self.check_frame(frame)
        if score and scorer.settings.perturb == "values":
            texts, spans = self.serializer.serialize_frame_with_spans(frame)
            rows = encode(self.tokenizer, texts, None, self.max_length, spans)
        else:
            rows = encode(self.tokenizer, self.serializer.serialize_frame(frame), None, self.max_length)
        input_ids = rows.input_ids
        if score:
            scores = scorer.score(input_ids, value_masks=rows.value_masks)
            predicted, probability = scores.predicted, scores.confidence
            consistency, lcb, certified = scores.consistency, scores.lcb, scores.certified
        else:
            probabilities = scorer.predict_proba(input_ids)
            predicted = probabilities.argmax(axis=1)
            probability = probabilities[np.arange(len(predicted)), predicted]
            consistency = lcb = np.full(len(predicted), None, dtype=object)
            certified = np.zeros(len(predicted), dtype=bool)
        return pd.DataFrame(
            {
                "prediction": [self.labels[c] for c in predicted],
                "probability": np.asarray(probability, dtype=np.float64),
                "consistency": consistency,
                "consistency_lcb": lcb,
                "certified": np.asarray(certified, dtype=bool),
            }
        )

    # -- disk ---------------------------------------------------------------
    def write(self, directory: str | Path, backend: str = "torch") -> None:
        """Weights (LoRA merged), tokenizer, serializer, labels, settings, evidence; ONNX graph if asked."""
        check_choice("backend", backend, BACKENDS)
        check_backend_precision(backend, self.settings.precision)
        directory = Path(directory)
        save_classifier(self.classifier, directory / CLASSIFIER_DIR, self.spec)
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        if backend == "onnx":
            from mlflow_tabcons.scoring.onnx import export_onnx

            export_onnx(self.classifier, directory / ONNX_DIR)
        config = {
            "labels": self.labels,
            "serializer": self.serializer.to_dict(),
            "scorer": self.settings.to_dict(),
            "max_length": self.max_length,
            "required": self.required,
            "max_k": self.max_k,
            "backend": backend,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_json_scalar))
        if self.evidence is not None:
            (directory / EVIDENCE_FILE).write_text(json.dumps(self.evidence, indent=2, default=_json_scalar))

    @classmethod
    def read(cls, directory: str | Path, backend: str | None = None) -> TabconsModel:
        """Load what ``write`` wrote, with no network; ``backend`` overrides the one chosen at save time."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        backend = backend or config["backend"]
        check_choice("backend", backend, BACKENDS)
        settings = ScorerSettings(**config["scorer"])
        check_backend_precision(backend, settings.precision)
        if backend == "onnx" and not (directory / ONNX_DIR).is_dir():
            raise TabconsInputError("this model was saved without an ONNX graph: save it with backend='onnx'")
        classifier, spec = load_classifier(directory / CLASSIFIER_DIR)
        evidence_path = directory / EVIDENCE_FILE
        return cls(
            classifier=classifier,
            spec=spec,
            tokenizer=load_tokenizer(str(directory / TOKENIZER_DIR), spec.family),
            serializer=RowSerializer.from_dict(config["serializer"]),
            labels=list(config["labels"]),
            settings=settings,
            max_length=config["max_length"],
            required=list(config["required"]),
            max_k=config["max_k"],
            evidence=json.loads(evidence_path.read_text()) if evidence_path.exists() else None,
            backend=_onnx_backend(directory / ONNX_DIR) if backend == "onnx" else None,
        )


def check_backend_precision(backend: str, precision: str) -> None:
    """ONNX graphs run in float32 only; refuse a bfloat16 setting there rather than ignore it."""
    if backend == "onnx" and precision != "float32":
        raise TabconsInputError(
            f"the ONNX backend runs float32 only, but the scorer's precision is {precision!r}: "
            "use the torch backend for bfloat16 neighbour passes"
        )


def _onnx_backend(directory: Path) -> ProbabilityBackend:
    from mlflow_tabcons.scoring.onnx import OnnxBackend

    return OnnxBackend(directory)


def _json_scalar(value: Any) -> Any:
    """numpy scalars (labels read from a table, evidence numbers) as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")

