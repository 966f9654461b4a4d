import numpy as np
import pytest
import torch

from mlflow_tabcons.scoring.bounds import empirical_bernstein_lcb
from mlflow_tabcons.scoring.consistency import (
    ConsistencyScorer,
    ScorerSettings,
    TorchBackend,
    neighbourhood_radius,
    typical_norm,
)
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.training import encode
from mlflow_tabcons.members.classifier import LoraSettings, build_classifier, load_base_model, load_tokenizer


class RecordingBackend:
    """A transparent model: p(class 1) = sigmoid(scale * mean of the row's real embedding entries)."""

    def __init__(self, dim: int = 4, scale: float = 3.0):
        self.dim, self.scale, self.calls = dim, scale, []

    def embed(self, input_ids):
        """Rows whose ids average near 30 sit near the decision boundary."""
        generator = torch.Generator().manual_seed(int(input_ids.sum()))
        noise = 0.3 * torch.randn((len(input_ids), self.dim), generator=generator)
        return noise + (input_ids.float().mean() - 30) / 30

    def probabilities(self, embeddings, attention_mask):
        self.calls.append((embeddings.clone(), attention_mask.clone()))
        mask = attention_mask[..., None].float()
        mean = (embeddings * mask).sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * embeddings.shape[2])
        p1 = torch.sigmoid(self.scale * mean).numpy().astype(np.float64)
        return np.stack([1 - p1, p1], axis=1)


ROWS = [torch.tensor([1, 5, 9]), torch.tensor([2, 3]), torch.tensor([7, 7, 7, 7, 7]), torch.tensor([4])]


def test_neighbours_lie_on_the_sphere_around_the_real_tokens_only():
    backend = RecordingBackend()
    settings = ScorerSettings(k=8, sigma=0.25, sigma_mode="relative")
    ConsistencyScorer(backend, settings).score(ROWS)
    neighbour_calls = backend.calls[1:]  # the first call scores the unperturbed rows
    seen = 0
    for embeddings, mask in neighbour_calls:
        for x, m in zip(embeddings, mask):
            length = int(m.sum())
            row = next(r for r in ROWS if len(r) == length)
            center = backend.embed(row)
            assert torch.all(x[length:] == 0), "padding positions must not be perturbed"
            distance = float((x[:length] - center).norm())
            assert distance == pytest.approx(0.25 * typical_norm(center), rel=1e-5)
            seen += 1
    assert seen == 8 * len(ROWS)


def test_relative_radius_is_the_frobenius_norm_where_tokens_are_alike():
    states = torch.randn(180, 64, generator=torch.Generator().manual_seed(0))
    assert typical_norm(states) == pytest.approx(float(states.norm()), rel=0.03)


def test_relative_radius_is_not_set_by_one_attention_sink_token():
    """A decoder's first token can be 40x longer than the rest; the radius must follow the rest."""
    states = torch.randn(180, 64, generator=torch.Generator().manual_seed(0))
    with_sink = states.clone()
    with_sink[0] *= 40.0
    settings = ScorerSettings(sigma=0.5)
    assert float(with_sink.norm()) > 3 * float(states.norm())  # what the plain Frobenius norm would follow
    assert neighbourhood_radius(with_sink, settings) == pytest.approx(neighbourhood_radius(states, settings), rel=0.02)


def test_score_is_the_formula_of_method_md():
    backend = RecordingBackend()
    settings = ScorerSettings(k=16, sigma=2.0, sigma_mode="absolute")
    scores = ConsistencyScorer(backend, settings).score(ROWS[:1])
    base = backend.probabilities(backend.embed(ROWS[0])[None], torch.ones(1, 3, dtype=torch.long))[0]
    c = int(base.argmax())
    g = np.concatenate([backend.probabilities(e, m)[:, c] for e, m in backend.calls[1:-1]])
    z = g - np.abs(base[c] - g)
    assert len(z) == 16
    assert scores.consistency[0] == pytest.approx(z.mean())
    assert scores.lcb[0] == pytest.approx(empirical_bernstein_lcb(z[None], 0.05)[0])
    assert scores.predicted[0] == c and scores.confidence[0] == pytest.approx(base[c])
    assert scores.certified[0] == (scores.lcb[0] > 0.5)


def test_reproducible_and_independent_of_order_and_batching():
    settings = ScorerSettings(k=20, sigma=0.5, seed=11)
    a = ConsistencyScorer(RecordingBackend(), settings).score(ROWS)
    b = ConsistencyScorer(RecordingBackend(), settings.with_overrides(max_batch_tokens=7)).score(ROWS[::-1])
    # padding to another batch length changes float32 summation order, nothing more
    np.testing.assert_allclose(a.consistency, b.consistency[::-1], atol=1e-6)
    np.testing.assert_allclose(a.lcb, b.lcb[::-1], atol=1e-6)
    c = ConsistencyScorer(RecordingBackend(), settings.with_overrides(seed=12)).score(ROWS)
    assert not np.allclose(a.consistency, c.consistency)


def test_early_stopping_decides_the_same_and_saves_passes():
    """With the anytime-valid bound, stopping a decided row never changes its certificate."""
    rows = [torch.tensor([i, i + 1, i + 2]) for i in range(0, 60, 3)]
    backend = RecordingBackend(scale=3.0)
    full = ConsistencyScorer(backend, ScorerSettings(k=256, sigma=1.0, bound="betting")).score(rows)
    early = ConsistencyScorer(backend, ScorerSettings(k=256, sigma=1.0, bound="betting", early_stop=True)).score(rows)
    np.testing.assert_array_equal(early.certified, full.certified)
    assert early.samples.sum() < 0.6 * full.samples.sum()
    assert np.all(full.samples == 256) and early.samples.min() >= 16
    assert 0 < full.certified.sum() < len(rows), "the fixture should hold both kinds of rows"


def test_scores_stay_in_range_on_a_real_tiny_model(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    classifier = build_classifier(load_base_model(tiny_model_dir), 2, lora=LoraSettings(), seed=0)
    rows = encode(tokenizer, ["age: 42. job: clerk.", "age: 7.", "x: 1. y: 2. z: 3."], None, 64).input_ids
    scores = ConsistencyScorer(TorchBackend(classifier), ScorerSettings(k=32, sigma=0.5)).score(rows)
    assert np.all((-1 <= scores.consistency) & (scores.consistency <= 1))
    assert np.all(scores.lcb < scores.consistency)
    np.testing.assert_array_equal(scores.certified, scores.lcb > 0.5)
    np.testing.assert_allclose(scores.probabilities.sum(axis=1), 1.0, atol=1e-6)
    fraction, low, high = scores.certified_fraction()
    assert low <= fraction <= high
    frame = scores.to_frame()
    assert list(frame.columns) == ["predicted_class", "confidence", "consistency", "consistency_lcb", "certified", "neighbours"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k": 1}, "k must be between 2"),
        ({"k": 10**9}, "k must be between 2"),
        ({"sigma": 0.0}, r"sigma must be in \(0.0"),
        ({"sigma": -1.0}, "sigma"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 0.0}, "alpha"),
        ({"bound": "hoeffding"}, "bound"),
        ({"early_stop": True}, "early_stop needs the anytime-valid bound 'betting'"),
        ({"sigma_mode": "percent"}, "sigma_mode"),
        ({"k": 2.5}, "k must be an integer"),
        ({"frobnicate": 1}, "unknown scorer setting"),
    ],
)
def test_bad_settings_are_refused_with_the_parameter_named(overrides, message):
    with pytest.raises(TabconsInputError, match=message):
        ScorerSettings().with_overrides(**overrides)


def test_empty_input_is_refused():
    with pytest.raises(TabconsInputError, match="no rows"):
        ConsistencyScorer(RecordingBackend()).score([])


def test_bfloat16_passes_stay_close_to_float32_and_differ_from_them(tiny_model_dir):
    classifier = build_classifier(load_base_model(tiny_model_dir), 2, lora=LoraSettings(), seed=0)
    embeddings = torch.randn(6, 9, classifier.config.hidden_size)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[3:, 5:] = 0
    exact = TorchBackend(classifier).probabilities(embeddings, mask)
    fast = TorchBackend(classifier, precision="bfloat16").probabilities(embeddings, mask)
    assert fast.dtype == exact.dtype and fast.shape == exact.shape
    np.testing.assert_allclose(fast, exact, atol=0.03)
    assert np.abs(fast - exact).max() > 0, "the bfloat16 path must really run in lower precision"


def test_an_unknown_precision_is_refused(tiny_model_dir):
    classifier = build_classifier(load_base_model(tiny_model_dir), 2, lora=LoraSettings(), seed=0)
    with pytest.raises(TabconsInputError, match="precision must be one of"):
        TorchBackend(classifier, precision="float16")
