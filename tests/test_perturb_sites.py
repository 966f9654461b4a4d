"""Where the consistency score perturbs: input embeddings, value tokens only, hidden state, pooled vector."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_tabcons_model
from test_consistency import RecordingBackend

from mlflow_tabcons.data.serialize import RowSerializer
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.flavor import TabconsModel
from mlflow_tabcons.members.classifier import LoraSettings, build_classifier, load_base_model, load_tokenizer
from mlflow_tabcons.members.training import encode
from mlflow_tabcons.scoring.consistency import PERTURB_SITES, ConsistencyScorer, ScorerSettings, TorchBackend, neighbour_directions, typical_norm
from mlflow_tabcons.tracking.config import TrainingConfig


@pytest.fixture(scope="module")
def classifier(tiny_model_dir):
    return build_classifier(load_base_model(tiny_model_dir), 2, lora=LoraSettings(layers=2), seed=0).eval()


def test_the_head_alone_finishes_the_pooled_path(classifier):
    ids = torch.tensor([[101, 2287, 1024, 4413, 1012, 102], [101, 2287, 1024, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        pooled = classifier.pooled_from_embeddings(classifier.embed(ids), mask)
        np.testing.assert_allclose(classifier.logits_from_pooled(pooled).numpy(), classifier(ids, mask).numpy(), atol=1e-6)
    assert pooled.shape == (2, classifier.config.hidden_size)


def test_hidden_and_pooled_sites_start_where_the_model_would_be_anyway(classifier, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = encode(tokenizer, ["age: 42. job: clerk.", "age: 7."], None, 64).input_ids
    plain = ConsistencyScorer(TorchBackend(classifier)).predict_proba(rows)
    depth = classifier.prefix_layers(2)
    assert depth == 2  # 4 layers, LoRA on the top 2
    backend = TorchBackend(classifier, hidden_depth=depth)
    for site in ("hidden", "pooled"):
        states = backend.represent(rows[0], site)
        assert states.shape == ((len(rows[0]), 32) if site == "hidden" else (1, 32))
        scorer = ConsistencyScorer(backend, ScorerSettings(k=8, perturb=site))
        np.testing.assert_allclose(scorer.predict_proba(rows), plain, atol=1e-5)
        scores = scorer.score(rows)
        np.testing.assert_allclose(scores.confidence, plain.max(axis=1), atol=1e-5)
        assert np.all((-1 <= scores.consistency) & (scores.consistency <= 1))
    with torch.no_grad():
        expected = classifier.frozen_prefix(rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long), depth)[0]
    np.testing.assert_allclose(backend.represent(rows[0], "hidden").numpy(), expected.numpy(), atol=1e-6)


def test_each_site_moves_a_different_thing_so_scores_differ(classifier, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    texts, spans = RowSerializer(["age", "job"]).serialize_frame_with_spans(pd.DataFrame({"age": [42, 7], "job": ["clerk", "chef"]}))
    rows = encode(tokenizer, texts, None, 64, spans)
    backend = TorchBackend(classifier, hidden_depth=2)
    consistency = {
        site: ConsistencyScorer(backend, ScorerSettings(k=16, sigma=1.0, perturb=site)).score(rows.input_ids, value_masks=rows.value_masks).consistency
        for site in PERTURB_SITES
    }
    for a, b in [("embeddings", "values"), ("embeddings", "hidden"), ("hidden", "pooled")]:
        assert not np.allclose(consistency[a], consistency[b])


def test_values_site_moves_only_the_value_tokens_on_a_sphere_of_their_own_norm():
    backend = RecordingBackend()
    rows = [torch.tensor([1, 5, 9, 4]), torch.tensor([2, 3, 8])]
    masks = [torch.tensor([False, True, True, False]), torch.tensor([False, False, True])]
    settings = ScorerSettings(k=8, sigma=0.5, perturb="values")
    ConsistencyScorer(backend, settings).score(rows, value_masks=masks)
    seen = 0
    for embeddings, mask in backend.calls[1:]:
        for x, m in zip(embeddings, mask):
            length = int(m.sum())
            i = [len(r) for r in rows].index(length)
            center, positions = backend.embed(rows[i]), masks[i]
            moved = (x[:length] - center).abs().sum(dim=1) > 0
            np.testing.assert_array_equal(moved.numpy(), positions.numpy())
            distance = float((x[:length] - center).norm())
            assert distance == pytest.approx(0.5 * typical_norm(center[positions]), rel=1e-5)
            seen += 1
    assert seen == 8 * len(rows)


def test_gaussian_neighbours_have_the_radius_on_average():
    directions = neighbour_directions(b"key", 0, 4000, (3, 4), "gaussian", torch.tensor([True, False, True]))
    assert torch.all(directions[:, 1] == 0)
    assert float((directions.flatten(1).norm(dim=1) ** 2).mean()) == pytest.approx(1.0, rel=0.05)


def test_value_spans_and_masks_mark_the_values_not_the_template(tiny_model_dir):
    serializer = RowSerializer(["age", "job", "city"], template="text", question="Yes or no?")
    text, spans = serializer.serialize_with_spans({"age": 42, "job": "bank clerk", "city": None})
    assert text == "The age is 42. The job is bank clerk. Yes or no?"
    assert [text[a:b] for a, b in spans] == ["42", "bank clerk"]
    assert serializer.serialize({"age": 42, "job": "bank clerk", "city": None}) == text
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = encode(tokenizer, [text], None, 64, [spans])
    tokens = tokenizer.convert_ids_to_tokens(rows.input_ids[0].tolist())
    marked = [token for token, hit in zip(tokens, rows.value_masks[0].tolist()) if hit]
    assert marked == ["42", "bank", "clerk"]
    assert rows.subset([0]).value_masks[0].tolist() == rows.value_masks[0].tolist()


def test_sites_are_refused_where_they_cannot_work():
    with pytest.raises(TabconsInputError, match="perturb must be one of"):
        ScorerSettings(perturb="logits")
    with pytest.raises(TabconsInputError, match="needs a backend that runs the model from inside"):
        ConsistencyScorer(RecordingBackend(), ScorerSettings(perturb="hidden"))
    scorer = ConsistencyScorer(RecordingBackend(), ScorerSettings(k=4, perturb="values"))
    with pytest.raises(TabconsInputError, match="needs each row's value-token mask"):
        scorer.score([torch.tensor([1, 2])])
    with pytest.raises(TabconsInputError, match="row 0 has no value tokens"):
        scorer.score([torch.tensor([1, 2])], value_masks=[torch.tensor([False, False])])
    with pytest.raises(TabconsInputError, match="value mask of row 0 has shape"):
        scorer.score([torch.tensor([1, 2])], value_masks=[torch.tensor([True])])
    with pytest.raises(TabconsInputError, match="ONNX backend perturbs only at"):
        TrainingConfig(register=None, serve_backend="onnx", scorer=ScorerSettings(perturb="pooled"))


def test_the_packaged_model_keeps_and_serves_its_site(tiny_model_dir, diabetes_features, tmp_path):
    model = build_tabcons_model(tiny_model_dir)
    model.settings = model.settings.with_overrides(perturb="values", noise="gaussian")
    model.write(tmp_path / "model")
    loaded = TabconsModel.read(tmp_path / "model")
    assert (loaded.settings.perturb, loaded.settings.noise) == ("values", "gaussian")
    answer = loaded.predict(diabetes_features.head(3))
    assert answer["consistency"].notna().all()
    plain = TabconsModel.read(tmp_path / "model")
    plain.settings = plain.settings.with_overrides(perturb="embeddings")
    assert not np.allclose(plain.predict(diabetes_features.head(3))["consistency"], answer["consistency"])
