"""Baselines the consistency score must beat (docs/method.md, "Evaluation protocol", step 3).

- confidence: the reference member's probability of its predicted class, as is;
- MC-dropout (Gal & Ghahramani 2016): T stochastic forward passes of the
  reference member with its dropout modules switched on; the variance of the
  predicted-class probability across passes. Its *measure* is minus that
  variance, so that for every measure high means stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mlflow_tabcons.metrics import multiplicity
from mlflow_tabcons.errors import TabconsInputError, check_int
from mlflow_tabcons.members.batching import pad
from mlflow_tabcons.members.classifier import TabularClassifier


def _dropout_modules(classifier: nn.Module) -> list[nn.Module]:
    return [module for module in classifier.modules() if isinstance(module, nn.modules.dropout._DropoutNd)]


@torch.inference_mode()
def mc_dropout_probabilities(
    classifier: TabularClassifier,
    input_ids: Sequence[torch.Tensor],
    *,
    passes: int = 20,
    seed: int = 0,
    prefix: Sequence[torch.Tensor] | None = None,
    depth: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Class probabilities (passes, n, C) of ``passes`` dropout-on forward passes.

    With ``prefix`` (hidden states after the first ``depth`` frozen layers, as
    the ensemble trainer caches them) only the layers above run, which is where
    dropout acted while the member was trained. Seeded and repeatable; the
    global RNG and the classifier's train/eval modes are left as they were.
    """
    passes = check_int("passes", passes, minimum=2, maximum=10_000)
    check_int("seed", seed, minimum=0)
    if len(input_ids) == 0:
        raise TabconsInputError("nothing to score: the input has no rows")
    if prefix is not None and len(prefix) != len(input_ids):
        raise TabconsInputError(f"prefix has {len(prefix)} rows but input_ids has {len(input_ids)}")
    dropouts = _dropout_modules(classifier)
    if not dropouts:
        raise TabconsInputError("the classifier has no dropout modules: MC-dropout needs some")
    modes = [(module, module.training) for module in classifier.modules()]
    classifier.eval()
    for module in dropouts:
        module.train()
    out = np.empty((passes, len(input_ids), classifier.num_labels))
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if device != "cpu" else []):
            torch.manual_seed(seed)
            for t in range(passes):
                for start in range(0, len(input_ids), batch_size):
                    stop = min(start + batch_size, len(input_ids))
                    if prefix is not None:
                        hidden, mask = pad(prefix[start:stop])
                        logits = classifier.logits_from_prefix(hidden.to(device), mask.to(device), depth)
                    else:
                        ids, mask = pad(input_ids[start:stop])
                        logits = classifier(ids.to(device), mask.to(device))
                    out[t, start:stop] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    finally:
        for module, training in modes:
            module.training = training
    return out


def dropout_measure(pass_probabilities: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Minus the variance, across passes, of each row's probability of ``predicted[row]``."""
    chosen = multiplicity.class_probabilities(pass_probabilities, predicted)
    return -multiplicity.prediction_variance(chosen)
