"""ONNX Runtime as the scorer's engine: export the classifier from embeddings, run it in a session.

The scorer's k neighbours of a row are points in embedding space, so the
exported graph starts at ``inputs_embeds`` (B, L, d) with an attention mask
(B, L) and ends at class probabilities (B, C); batch and length are dynamic.
The embedding lookup E(x) stays outside the graph as a plain matrix, which is
all ``embed`` needs. Export uses the TorchScript exporter (``dynamo=False``):
the dynamo exporter needs ``onnxscript``, which is not a dependency here.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlflow_tabcons.members.classifier import TabularClassifier

ONNX_FILE = "classifier.onnx"
EMBEDDING_FILE = "embedding.npy"
OPSET = 17
INPUTS = ("inputs_embeds", "attention_mask")
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class _ProbabilitiesFromEmbeddings(nn.Module):
    def __init__(self, classifier: TabularClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier.logits_from_embeddings(inputs_embeds, attention_mask), dim=-1)


def _merged(classifier: TabularClassifier) -> TabularClassifier:
    """A CPU copy with any LoRA adapters merged into the encoder (the graph then has no adapter branches)."""
    merged = copy.deepcopy(classifier).cpu().eval()
    if hasattr(merged.encoder, "merge_and_unload"):
        merged.encoder = merged.encoder.merge_and_unload()
    return merged


def export_onnx(classifier: TabularClassifier, directory: str | Path) -> Path:
    """Write ``classifier.onnx`` (embeddings + mask -> probabilities) and the embedding matrix."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged = _merged(classifier)
    hidden = merged.config.hidden_size
    example = (torch.zeros(2, 8, hidden), torch.ones(2, 8, dtype=torch.long))
    dynamic = {0: "batch", 1: "length"}
    with warnings.catch_warnings():  # tracer warnings about shape-dependent Python branches in transformers' masks
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ProbabilitiesFromEmbeddings(merged).eval(),
            example,
            str(directory / ONNX_FILE),
            input_names=list(INPUTS),
            output_names=["probabilities"],
            dynamic_axes={
                "inputs_embeds": dynamic,
                "attention_mask": dynamic,
                "probabilities": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    weight = merged.encoder.get_input_embeddings().weight.detach().float().numpy()
    np.save(directory / EMBEDDING_FILE, weight)
    return directory / ONNX_FILE


def available_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu and a GPU are present, the CPU provider always."""
    import onnxruntime

    present = set(onnxruntime.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in present]


class OnnxBackend:
    """The scorer's ``ProbabilityBackend`` over an ONNX Runtime session."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime

        directory = Path(directory)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the CUDA provider's fallback notes are not errors
        self.session = onnxruntime.InferenceSession(
            str(directory / ONNX_FILE), options, providers=providers or available_providers()
        )
        self.embedding = torch.from_numpy(np.load(directory / EMBEDDING_FILE))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[input_ids]

    def probabilities(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        feeds: dict[str, Any] = {
            "inputs_embeds": embeddings.float().numpy(),
            "attention_mask": attention_mask.to(torch.long).numpy(),
        }
        return self.session.run(None, feeds)[0].astype(np.float64)
