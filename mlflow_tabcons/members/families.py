"""Model families and what each architecture needs: where its layers are, which modules LoRA wraps.

Three families of Hugging Face checkpoints can be members (docs/models.md):
``encoder`` (BERT, MiniLM, RoBERTa: a pooled hidden state and a linear head),
``decoder`` (Llama, Qwen2, Mistral, Phi, GPT-2, SmolLM: causal language
models read at the answer position) and ``encoder-decoder`` (T5, Flan-T5: the
decoder's first step). Everything here is read from the checkpoint's config
and from peft's own per-model-type table, never from a hand-written list.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mlflow_tabcons.errors import TabconsInputError

ENCODER = "encoder"
DECODER = "decoder"
ENCODER_DECODER = "encoder-decoder"
FAMILIES = (ENCODER, DECODER, ENCODER_DECODER)
GENERATIVE = (DECODER, ENCODER_DECODER)
# peft's catch-all for architectures its per-model-type table does not list
ALL_LINEAR = "all-linear"


def model_family(config: Any) -> str:
    """The family of a checkpoint's config: encoder-decoder, decoder (a causal LM type that is not a masked LM), or encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return DECODER
    return ENCODER


def lora_target_modules(config: Any) -> list[str] | str:
    """peft's default LoRA targets for this model type (``all-linear`` where peft has none)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type) or []) or ALL_LINEAR


def num_layers(config: Any) -> int | None:
    """The transformer layer count the config states (T5 maps it to ``num_layers``), or None."""
    return getattr(config, "num_hidden_layers", None)


def layer_stacks(backbone: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The module lists that hold the transformer layers: one for encoders and decoders, two for T5.

    Found by shape, not by name: the outermost ``ModuleList``s whose length is
    the config's layer count (``encoder.layer`` in BERT, ``layers`` in Llama,
    ``h`` in GPT-2, ``encoder.block`` and ``decoder.block`` in T5).
    """
    count = num_layers(backbone.config)
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in backbone.named_modules():
        if not name or not isinstance(module, nn.ModuleList) or len(module) != count:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def lora_layer_selection(backbone: nn.Module, top: int | None) -> dict[str, Any]:
    """peft's ``layers_to_transform`` and ``layers_pattern`` for the top ``top`` layers (empty: every layer)."""
    count = num_layers(backbone.config)
    if top is None or count is None or top >= count:
        return {}
    stacks = layer_stacks(backbone)
    patterns = sorted({name.rsplit(".", 1)[-1] for name, _ in stacks})
    if len(patterns) != 1:
        raise TabconsInputError(
            f"cannot find the layer stack of this {backbone.config.model_type!r} model to put LoRA on its top {top} "
            "layers: use --lora-layers 0 (every layer)"
        )
    return {"layers_to_transform": list(range(count - top, count)), "layers_pattern": patterns[0]}
