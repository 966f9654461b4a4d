"""Where the consistency score perturbs: input embeddings, value tokens only, hidden state, pooled vector."""

import numpy as np
import pytest
import torch

from mlflow_tabcons.members.classifier import LoraSettings, build_classifier, load_encoder


@pytest.fixture(scope="module")
def classifier(tiny_model_dir):
    return build_classifier(load_encoder(tiny_model_dir), 2, lora=LoraSettings(layers=2), seed=0).eval()


def test_the_head_alone_finishes_the_pooled_path(classifier):
    ids = torch.tensor([[101, 2287, 1024, 4413, 1012, 102], [101, 2287, 1024, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        pooled = classifier.pooled_from_embeddings(classifier.embed(ids), mask)
        np.testing.assert_allclose(classifier.logits_from_pooled(pooled).numpy(), classifier(ids, mask).numpy(), atol=1e-6)
    assert pooled.shape == (2, classifier.config.hidden_size)
