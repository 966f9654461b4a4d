"""The tabular classifier: a Hugging Face model, LoRA adapters, and a head read at the answer.

Every family (docs/models.md) gives the head one hidden state per row:
encoders pool their last layer (mean or first token), decoders read the last
real token, where the answer word would come next, and encoder-decoders read
the decoder's first step. The head is ``linear`` (a fresh layer) or
``verbalizer``: the rows of the language-model head that score the answer
words, so class probabilities are the softmax over those words' scores.

The consistency scorer needs two things a stock model class hides: the token
embeddings E(x) (``embed``) and a forward pass that starts from perturbed
embeddings (``logits_from_embeddings``). Training needs a third: the frozen
prefix (members/prefix.py), computed once and shared by every epoch and seed.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int
from mlflow_tabcons.members import prefix
from mlflow_tabcons.members.checkpoints import DEFAULT_MODEL
from mlflow_tabcons.members.families import (
    DECODER,
    ENCODER,
    ENCODER_DECODER,
    FAMILIES,
    GENERATIVE,
    lora_layer_selection,
    lora_target_modules,
    model_family,
)

POOLINGS = ("mean", "cls")
HEADS = ("auto", "verbalizer", "linear")
# What generative members read their answer after; see RowSerializer.answer_cue
ANSWER_CUE = "Answer:"


@dataclass(frozen=True)
class LoraSettings:
    """Where and how big the LoRA adapters are.

    ``target_modules`` empty means peft's default for the model type (e.g.
    q_proj and v_proj for Llama, c_attn for GPT-2, q and v for T5).
    ``layers`` counts transformer layers from the top (None: every layer). The
    layers below stay frozen, so their output is computed once per ensemble.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ()
    layers: int | None = 3

    def __post_init__(self) -> None:
        check_int("lora rank", self.rank, minimum=1, maximum=1024)
        check_float("lora alpha", self.alpha, low=0.0, low_open=True)
        check_float("lora dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.layers is not None:
            check_int("lora layers", self.layers, minimum=1)


def _unreachable_model_message(model_path: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
    return (
        f"cannot load model {model_path!r}: not a local model directory, and the Hugging Face Hub "
        f"could not provide it{hint}. Use 'minilm' or 'smollm2' for the packaged offline models. ({error})"
    )


def load_tokenizer(model_path: str, family: str = ENCODER) -> Any:
    """The checkpoint's tokenizer; generative families cut long rows from the left, keeping the question and cue."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as error:
        raise TabconsInputError(_unreachable_model_message(model_path, error)) from None
    if family in GENERATIVE:
        tokenizer.truncation_side = "left"
    return tokenizer


def _backbone(encoder: nn.Module) -> nn.Module:
    """The underlying transformers model, under any PEFT wrapping."""
    get_base = getattr(encoder, "get_base_model", None)
    return get_base() if callable(get_base) else encoder


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whichever side the padding is on."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(-1).to(torch.long).argmax(-1)


class TabularClassifier(nn.Module):
    """Backbone (+LoRA) -> one hidden state per row (pooled or at the answer) -> class logits."""

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        *,
        family: str = ENCODER,
        head: str = "linear",
        pooling: str = "mean",
        dropout: float = 0.1,
    ):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        check_choice("family", family, FAMILIES)
        check_choice("head", head, HEADS[1:])
        self.encoder = encoder
        self.family = family
        self.head_kind = head
        self.pooling = pooling
        self.num_labels = check_int("num_labels", num_labels, minimum=2)
        hidden = _backbone(encoder).config.hidden_size
        # the verbalizer reads the language model's own scores: no dropout in front of them
        self.dropout = nn.Dropout(dropout if head == "linear" else 0.0)
        self.head = nn.Linear(hidden, num_labels)

    @property
    def config(self) -> Any:
        return _backbone(self.encoder).config

    @property
    def backbone(self) -> nn.Module:
        """The transformers model itself (LoRA layers included), without the PEFT wrapper."""
        return _backbone(self.encoder)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """E(x): the output of the input embedding layer (before positions and norm)."""
        return self.encoder.get_input_embeddings()(input_ids)

    def hidden_states(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's states: (B, L, d) for encoders and decoders, the decoder's first step (B, 1, d) for T5."""
        if self.family == DECODER:
            positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
            output = self.encoder(
                inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=positions, use_cache=False
            )
        elif self.family == ENCODER_DECODER:
            start = torch.full(
                (embeddings.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long, device=embeddings.device
            )
            output = self.encoder(
                inputs_embeds=embeddings, attention_mask=attention_mask, decoder_input_ids=start, use_cache=False
            )
        else:
            output = self.encoder(inputs_embeds=embeddings, attention_mask=attention_mask)
        return output.last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) last hidden states -> (B, d), the head's input: the state at the answer position
        (decoders), the decoder's first step (encoder-decoders), or the pooled sentence vector (encoders)."""
        if self.family == DECODER:
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), answer_positions(attention_mask)]
        if self.family == ENCODER_DECODER or self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head alone: (B, d) pooled states -> (B, C) logits (the scorer perturbs here at its ``pooled`` site)."""
        return self.head(self.dropout(pooled))

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits from the last layer's states."""
        return self.logits_from_pooled(self.pool(hidden, attention_mask))

    def pooled_from_embeddings(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The state the head reads, from input embeddings."""
        return self.pool(self.hidden_states(embeddings, attention_mask), attention_mask)

    def logits_from_embeddings(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits_from_pooled(self.pooled_from_embeddings(embeddings, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embeddings(self.embed(input_ids), attention_mask)

    # -- the frozen prefix (members/prefix.py) --------------------------------
    def prefix_layers(self, lora_layers: int | None) -> int:
        """How many bottom layers carry no adapter and can be cached (0 if unsupported)."""
        return prefix.prefix_depth(self.backbone, lora_layers)

    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first ``depth`` layers."""
        return prefix.frozen_prefix(self, input_ids, attention_mask, depth)

    def logits_from_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Finish the forward pass that ``frozen_prefix`` started."""
        return prefix.logits_from_prefix(self, hidden, attention_mask, depth)

    @contextmanager
    def attention(self, implementation: str) -> Iterator[None]:
        """Run with another attention implementation ("eager", "sdpa", ...), then switch back."""
        backbone = self.backbone
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
    family: str = ENCODER
    head: str = "linear"
    # the verbalizer's answer words and the token ids whose scores it reads
    answer_words: list[str] = field(default_factory=list)
    answer_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BaseModel:
    """A loaded base checkpoint: the backbone members copy, its family, and its language-model head.

    ``output_weight`` (V, d) and ``output_bias`` (V,) score every vocabulary
    token from the last hidden state (None for encoders); a verbalizer keeps
    only the answer words' rows of them.
    """

    backbone: nn.Module
    family: str
    output_weight: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None

    @property
    def config(self) -> Any:
        return self.backbone.config

    def answer_rows(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's weight and bias rows for ``token_ids``: the verbalizer's head."""
        if self.output_weight is None:
            raise TabconsInputError(
                f"the verbalizer head needs a generative model (decoder or encoder-decoder); this "
                f"{self.config.model_type!r} model is an encoder: use the linear head"
            )
        index = torch.as_tensor(list(token_ids), dtype=torch.long)
        weight = self.output_weight[index].detach().clone()
        bias = self.output_bias[index].detach().clone() if self.output_bias is not None else torch.zeros(len(index))
        return weight.float(), bias.float()


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The first token of each answer word as it follows the cue (" yes"): what the verbalizer scores.

    Words whose first tokens coincide cannot be told apart by first-token
    scores; they are refused with the words named.
    """
    ids = []
    for word in words:
        tokens = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not tokens:
            raise TabconsInputError(f"answer word {word!r} has no tokens")
        ids.append(int(tokens[0]))
    clashes = sorted({w for w, i in zip(words, ids) if ids.count(i) > 1})
    if clashes:
        raise TabconsInputError(
            f"answer words {clashes} begin with the same token, so the verbalizer cannot tell them apart: "
            "give words that differ in their first token (the data dictionary's answers section) or use the linear head"
        )
    return ids


def _load_pretrained(auto_class: Any, model_path: str) -> nn.Module:
    try:
        return auto_class.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
    except OSError as error:
        raise TabconsInputError(_unreachable_model_message(model_path, error)) from None
    except ValueError:  # architectures without SDPA support
        return auto_class.from_pretrained(model_path, dtype=torch.float32)


def checkpoint_family(model_path: str) -> str:
    """The family of the checkpoint at ``model_path`` (encoder, decoder, encoder-decoder)."""
    from transformers import AutoConfig

    try:
        return model_family(AutoConfig.from_pretrained(model_path))
    except OSError as error:
        raise TabconsInputError(_unreachable_model_message(model_path, error)) from None


def load_base_model(model_path: str) -> BaseModel:
    """The backbone of any supported checkpoint and, for generative families, its language-model head."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    family = checkpoint_family(model_path)
    if family == ENCODER:
        return BaseModel(_load_pretrained(AutoModel, model_path), family)
    language_model = _load_pretrained(AutoModelForCausalLM if family == DECODER else AutoModelForSeq2SeqLM, model_path)
    output = language_model.get_output_embeddings()
    weight = output.weight.detach()
    if getattr(language_model.config, "scale_decoder_outputs", False):  # T5 with tied embeddings
        weight = weight * language_model.config.d_model**-0.5
    backbone = language_model.base_model
    if backbone is language_model:  # T5 keeps its head beside the layers: the bare model with the same weights
        backbone = AutoModel.from_config(language_model.config, attn_implementation=language_model.config._attn_implementation)
        backbone.load_state_dict(language_model.state_dict(), strict=False)
    bias = getattr(output, "bias", None)
    return BaseModel(backbone.eval(), family, weight, None if bias is None else bias.detach())


# Config fields that hold the dropout on attention probabilities, by model family:
# BERT, RoBERTa, ELECTRA, DeBERTa use the first; DistilBERT and decoder LMs the second; GPT-2 the third.
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


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


def resolve_head(head: str, family: str) -> str:
    """``auto`` is the verbalizer for generative families and the linear head for encoders."""
    check_choice("head", head, HEADS)
    if head == "auto":
        return "verbalizer" if family in GENERATIVE else "linear"
    if head == "verbalizer" and family not in GENERATIVE:
        raise TabconsInputError("the verbalizer head needs a generative model (decoder or encoder-decoder): use --head linear")
    return head


def build_classifier(
    base: BaseModel,
    num_labels: int,
    *,
    lora: LoraSettings,
    seed: int,
    pooling: str = "mean",
    head_dropout: float = 0.1,
    head: str = "auto",
    answer_ids: Sequence[int] | None = None,
) -> TabularClassifier:
    """A fresh member: a copy of the base model with seeded LoRA adapters and head.

    LoRA wraps peft's default modules for the model type unless ``lora`` names
    others, on the top ``lora.layers`` layers of whichever stack the
    architecture has. A verbalizer head starts as the language model's rows
    for ``answer_ids`` and trains like any head (kept frozen, SmolLM2 members
    never learned credit-g, docs/models.md); a linear head starts seeded at random.
    """
    from peft import LoraConfig, get_peft_model

    kind = resolve_head(head, base.family)
    if kind == "verbalizer" and (answer_ids is None or len(answer_ids) != num_labels):
        raise TabconsInputError(f"the verbalizer head needs one answer token per class ({num_labels}), got {answer_ids}")
    encoder = copy.deepcopy(base.backbone)
    targets = list(lora.target_modules) or lora_target_modules(encoder.config)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        **lora_layer_selection(encoder, lora.layers),
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_encoder = get_peft_model(encoder, config)
    except ValueError as error:
        raise TabconsInputError(f"LoRA target modules {targets} do not fit this model: {error}") from None
    classifier = TabularClassifier(peft_encoder, num_labels, family=base.family, head=kind, pooling=pooling, dropout=head_dropout)
    if kind == "verbalizer":
        weight, bias = base.answer_rows(answer_ids)
        with torch.no_grad():
            classifier.head.weight.copy_(weight)
            classifier.head.bias.copy_(bias)
    return classifier


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
    spec = replace(spec, family=classifier.family, head=classifier.head_kind)
    (path / "classifier.json").write_text(json.dumps(asdict(spec), indent=2))


def load_classifier(path: str | Path) -> tuple[TabularClassifier, ClassifierSpec]:
    """Load what ``save_classifier`` wrote, offline, in evaluation mode."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = Path(path)
    spec = ClassifierSpec(**json.loads((path / "classifier.json").read_text()))
    classifier = TabularClassifier(
        _load_pretrained(AutoModel, str(path / "encoder")),
        spec.num_labels,
        family=spec.family,
        head=spec.head,
        pooling=spec.pooling,
        dropout=spec.head_dropout,
    )
    classifier.head.load_state_dict(load_file(str(path / "head.safetensors")))
    return classifier.eval(), spec
