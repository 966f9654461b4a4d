"""The frozen-prefix cache: the output of the layers below the first LoRA layer, computed once.

With LoRA on the top N layers only, the layers below never change while an
ensemble trains, so their output for a row is the same in every epoch of every
member. It is computed once per row (``compute_prefix``) and the forward pass
starts from it (``logits_from_prefix``).

Both halves run the checkpoint's own forward on a shortened layer list, so the
architecture's own masks (bidirectional or causal, sliding windows), rotary or
absolute positions and final norm apply unchanged: the prefix half captures the
state entering the first adapted layer (and stops there), the other half runs
the layers from there up and puts the cached states in where that layer reads
its input (at depth 0, the embeddings' output). Models with two layer stacks
(T5's encoder and decoder) are not cached and have no hidden site.

``classifier`` below is a ``TabularClassifier`` (members/classifier.py builds on
this module): its ``backbone``, ``embed``, ``hidden_states`` and ``classify``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.batching import pad
from mlflow_tabcons.members.families import layer_stacks


def prefix_depth(backbone: nn.Module, lora_layers: int | None) -> int:
    """How many bottom layers carry no adapter and can be cached (0 when none can)."""
    stacks = layer_stacks(backbone)
    if lora_layers is None or len(stacks) != 1:
        return 0
    return max(0, len(stacks[0][1]) - lora_layers)


@contextmanager
def _only_layers(backbone: nn.Module, start: int, stop: int | None) -> Iterator[nn.ModuleList]:
    """Run ``backbone`` with only its layers ``start:stop`` (and their per-layer attention types)."""
    stacks = layer_stacks(backbone)
    if len(stacks) != 1:
        raise TabconsInputError(
            f"the hidden state between layers needs one layer stack; this {backbone.config.model_type!r} model has "
            f"{len(stacks)} ({', '.join(name for name, _ in stacks) or 'none found'}): perturb at embeddings or values"
        )
    (name, layers), = stacks
    parent_name, _, attribute = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    config = backbone.config
    kept = nn.ModuleList(list(layers)[start:stop])
    saved = {"num_hidden_layers": config.num_hidden_layers, "layer_types": getattr(config, "layer_types", None)}
    setattr(parent, attribute, kept)
    config.num_hidden_layers = len(kept)
    if isinstance(saved["layer_types"], list):
        config.layer_types = saved["layer_types"][start:stop]
    try:
        yield kept
    finally:
        setattr(parent, attribute, layers)
        config.num_hidden_layers = saved["num_hidden_layers"]
        if isinstance(saved["layer_types"], list):
            config.layer_types = saved["layer_types"]


class _Reached(Exception):
    """Stops a forward pass once the state entering a layer has been captured: nothing above it is needed."""


def frozen_prefix(classifier: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
    """Hidden states (B, L, d) entering layer ``depth``: the embeddings' output after the first ``depth`` layers."""
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    with _only_layers(classifier.backbone, 0, depth + 1) as layers:
        handle = layers[depth].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            classifier.hidden_states(classifier.embed(input_ids), attention_mask)
        except _Reached:
            pass
        finally:
            handle.remove()
    return captured[-1]


def logits_from_prefix(classifier: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
    """Finish the forward pass that ``frozen_prefix`` started: the layers above ``depth``, the head."""
    backbone = classifier.backbone

    def feed_cached(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with _only_layers(backbone, depth, None) as layers:
        handle = layers[0].register_forward_pre_hook(feed_cached, with_kwargs=True)
        try:
            states = classifier.hidden_states(hidden, attention_mask)
        finally:
            handle.remove()
    return classifier.classify(states, attention_mask)


@torch.inference_mode()
def compute_prefix(
    classifier: nn.Module, input_ids: Sequence[torch.Tensor], depth: int, *, device: str = "cpu", batch_size: int = 64
) -> list[torch.Tensor]:
    """Per row: hidden states after the frozen layers, unpadded, on the CPU."""
    out: list[torch.Tensor] = []
    for start in range(0, len(input_ids), batch_size):
        chunk = input_ids[start : start + batch_size]
        ids, mask = pad(chunk)
        hidden = frozen_prefix(classifier, ids.to(device), mask.to(device), depth).float().cpu()
        out.extend(hidden[i, : len(row)].clone() for i, row in enumerate(chunk))
    return out
