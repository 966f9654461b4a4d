"""ONNX Runtime against PyTorch: the exported graph, the scorer on it, and the flavor's onnx backend."""

import copy

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_tabcons_model

from mlflow_tabcons import flavor
from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ScorerSettings, TorchBackend
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.training import encode
from mlflow_tabcons.scoring.onnx import OnnxBackend, available_providers, export_onnx

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained_like(tiny_model_dir):
    """A packaged model whose LoRA adapters are non-zero, so merging them at export changes the weights."""
    model = build_tabcons_model(tiny_model_dir, seed=5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.classifier.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def exported(trained_like, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    export_onnx(trained_like.classifier, directory)
    return OnnxBackend(directory)


def _padded_batch(hidden, lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn((len(lengths), max(lengths), hidden), generator=generator)
    mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return embeddings, mask


@pytest.mark.parametrize("lengths", [[5], [3, 9, 9, 1], [17, 4, 30, 12, 8, 2]])
def test_graph_matches_pytorch_for_any_batch_and_length(trained_like, exported, lengths):
    torch_backend = TorchBackend(trained_like.classifier)
    embeddings, mask = _padded_batch(trained_like.classifier.config.hidden_size, lengths, seed=len(lengths))
    expected = torch_backend.probabilities(embeddings, mask)
    got = exported.probabilities(embeddings, mask)
    assert got.shape == (len(lengths), 2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # the adapters matter: the same graph without them answers differently
    assert np.abs(expected - TorchBackend(_without_lora(trained_like.classifier)).probabilities(embeddings, mask)).max() > 1e-3


def _without_lora(classifier):
    bare = copy.deepcopy(classifier)
    with torch.no_grad():
        for name, parameter in bare.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    return bare


def test_embedding_lookup_matches_pytorch(trained_like, exported):
    ids = torch.tensor([101, 2054, 2003, 1996, 102])
    np.testing.assert_allclose(exported.embed(ids).numpy(), TorchBackend(trained_like.classifier).embed(ids).numpy(), atol=1e-6)


def test_scorer_on_onnx_gives_the_pytorch_scores_and_certificates(trained_like, exported, diabetes_features):
    texts = trained_like.serializer.serialize_frame(diabetes_features.head(8))
    ids = encode(trained_like.tokenizer, texts, None, trained_like.max_length).input_ids
    settings = ScorerSettings(k=32, seed=11)
    expected = ConsistencyScorer(TorchBackend(trained_like.classifier), settings).score(ids)
    got = ConsistencyScorer(exported, settings).score(ids)
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.consistency, expected.consistency, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got.predicted, expected.predicted)
    np.testing.assert_array_equal(got.certified, expected.certified)


def test_flavor_saved_with_the_onnx_backend_answers_like_pytorch(trained_like, diabetes_features, tmp_path):
    flavor.save_model(trained_like, tmp_path / "model", backend="onnx", input_example=diabetes_features.head(2))
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert isinstance(loaded.get_raw_model().backend, OnnxBackend)
    rows = diabetes_features.iloc[10:16]
    expected = trained_like.predict(rows)
    got = loaded.predict(rows)
    assert list(got["prediction"]) == list(expected["prediction"])
    assert list(got["certified"]) == list(expected["certified"])
    for column in ("probability", "consistency", "consistency_lcb"):
        np.testing.assert_allclose(got[column], expected[column], atol=1e-4, rtol=0, err_msg=column)
    torch_again = flavor.load_model(str(tmp_path / "model"), backend="torch")
    pd.testing.assert_frame_equal(torch_again.predict(rows), expected, atol=1e-6, rtol=0)


def test_providers_prefer_cuda_only_where_onnxruntime_has_it(exported):
    import onnxruntime

    present = onnxruntime.get_available_providers()
    assert available_providers()[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in available_providers()) == ("CUDAExecutionProvider" in present)
    assert exported.providers[0] == available_providers()[0]


def test_onnx_backend_of_a_model_saved_without_it_is_refused(trained_like, tmp_path):
    flavor.save_model(trained_like, tmp_path / "model")
    with pytest.raises(TabconsInputError, match="saved without an ONNX graph"):
        flavor.load_model(str(tmp_path / "model"), backend="onnx")
    with pytest.raises(TabconsInputError, match="backend must be one of"):
        flavor.save_model(trained_like, tmp_path / "other", backend="tensorrt")


def test_a_failed_export_leaves_no_half_written_model(trained_like, tmp_path, monkeypatch):
    import mlflow_tabcons.scoring.onnx

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(mlflow_tabcons.scoring.onnx, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        flavor.save_model(trained_like, tmp_path / "model", backend="onnx")
    assert not (tmp_path / "model").exists()
