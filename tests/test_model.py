from dataclasses import replace

import numpy as np
import pytest
import torch

from mlflow_tabcons.members.training import (
    PRIOR_WEIGHTS,
    EncodedRows,
    EnsembleTrainer,
    TrainSettings,
    adjust_class_prior,
    best_class_prior,
    class_prior_weight,
    encode,
    prior_shift,
)
from mlflow_tabcons.members.batching import pad
from mlflow_tabcons.members.classifier import (
    ClassifierSpec,
    LoraSettings,
    build_classifier,
    load_classifier,
    load_base_model,
    load_tokenizer,
    save_classifier,
    with_attention_dropout,
)
from mlflow_tabcons.errors import TabconsInputError

TEXTS = ["age: 42. job: clerk.", "age: 7.", "plasma glucose: 86. age: 24. Yes or no?", "credit amount: 1169."]


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    return load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir)


def test_frozen_prefix_path_equals_the_full_forward(parts):
    tokenizer, base = parts
    classifier = build_classifier(base, 3, lora=LoraSettings(layers=2), seed=0).eval()
    depth = classifier.prefix_layers(2)
    assert depth == 2  # the tiny model has 4 layers; LoRA wraps the top 2
    ids, mask = pad(encode(tokenizer, TEXTS, None, 64).input_ids)
    with torch.no_grad():
        full = classifier(ids, mask)
        split = classifier.logits_from_prefix(classifier.frozen_prefix(ids, mask, depth), mask, depth)
        via_embeddings = classifier.logits_from_embeddings(classifier.embed(ids), mask)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(via_embeddings, full)


def test_lora_wraps_only_the_top_layers(parts):
    _, base = parts
    classifier = build_classifier(base, 2, lora=LoraSettings(layers=1, target_modules=("query", "value")), seed=0)
    wrapped = {name.split(".layer.")[1].split(".")[0] for name, _ in classifier.named_parameters() if "lora_" in name}
    assert wrapped == {"3"}
    assert all(not p.requires_grad for n, p in classifier.named_parameters() if "lora_" not in n and "head" not in n)
    with pytest.raises(TabconsInputError, match="do not fit this model"):
        build_classifier(base, 2, lora=LoraSettings(target_modules=("no_such_module",)), seed=0)


def test_seeds_change_members_and_the_same_seed_repeats(parts):
    tokenizer, base = parts
    rows = encode(tokenizer, TEXTS * 4, np.array([0, 1, 0, 1] * 4), 64)
    trainer = EnsembleTrainer(base, 2, TrainSettings(epochs=2, batch_size=4, learning_rate=5e-3), rows, rows)
    a, b, a_again = (trainer.train_member(s) for s in (0, 1, 0))
    pa, pb, pa2 = (trainer.predict_proba(m.classifier, rows) for m in (a, b, a_again))
    np.testing.assert_allclose(pa, pa2, atol=1e-6)
    assert not np.allclose(pa, pb, atol=1e-4)
    assert [h["epoch"] for h in a.history] == [1.0, 2.0]
    assert {"train_loss", "val_accuracy", "val_balanced_accuracy", "val_auroc"} <= set(a.history[0])


@pytest.mark.parametrize(
    ("class_weight", "class_prior", "sign"),
    [("balanced", "data", 1.0), ("none", "uniform", -1.0), ("balanced", "uniform", 0.0), ("none", "data", 0.0),
     ("balanced", 0.25, 0.25), ("none", 0.25, -0.75)],
)
def test_class_prior_moves_the_bias_by_the_log_training_prior(class_weight, class_prior, sign):
    head = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(head.bias, 0.25)
    adjust_class_prior(head, np.array([0, 0, 0, 1, 1, 2, 0, 0]), 3, class_weight, class_prior)
    expected = 0.25 + sign * np.log([5 / 8, 2 / 8, 1 / 8])
    np.testing.assert_allclose(head.bias.detach().numpy(), expected, rtol=1e-6)


def test_data_prior_member_is_the_balanced_member_with_its_odds_scaled_by_the_prior(parts):
    """Same seed, same training: only the head bias differs, so p_data / p_uniform is proportional to the prior."""
    tokenizer, base = parts
    rows = encode(tokenizer, TEXTS * 4, np.array([0, 0, 0, 1] * 4), 64)
    members = {
        prior: EnsembleTrainer(base, 2, TrainSettings(epochs=1, batch_size=4, class_prior=prior), rows).train_member(3)
        for prior in ("data", "uniform")
    }
    trainer = EnsembleTrainer(base, 2, TrainSettings(epochs=1, batch_size=4), rows)
    p_data, p_uniform = (trainer.predict_proba(members[prior].classifier, rows) for prior in ("data", "uniform"))
    odds_ratio = (p_data[:, 0] / p_data[:, 1]) / (p_uniform[:, 0] / p_uniform[:, 1])
    np.testing.assert_allclose(odds_ratio, 3.0, rtol=1e-4)  # 12 rows of class 0 against 4 of class 1


def test_the_class_prior_is_the_validation_accuracy_argmax_over_the_weights():
    """A balanced head that ranks well but puts its threshold at 0.5: part of the 3:1 prior moves it right."""
    train_labels = np.array([0, 0, 0, 1] * 5)  # prior 3:1: the data prior lowers class 1's log odds by 1.10
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.55, 0.6, 0.62, 0.64, 0.2, 0.70, 0.8])  # the positives on top, four negatives above 0.5
    probabilities = np.stack([1 - p1, p1], axis=1)
    # the negatives at 0.55-0.64 (log odds up to 0.58) need a weight above 0.52, the positive at 0.70 (0.85) one
    # below 0.77: of the grid only 0.75 decides all 8 right; 1.0 loses the positive, 0.5 the negative at 0.64
    assert best_class_prior(probabilities, labels, train_labels, "balanced", configured=1.0) == 0.75
    # trained without weights the head already assumes the data prior: a weight of 1 leaves it as trained, and
    # the threshold that decides all 8 right lies beyond it (a weight above 1), between 0.64 and 0.70
    assert np.allclose(prior_shift(train_labels, 2, "none", 1.0), 0.0)
    weight = best_class_prior(probabilities, labels, train_labels, "none", 1.0)
    shifted = np.log(probabilities) + prior_shift(train_labels, 2, "none", weight)
    assert weight > 1.0 and np.argmax(shifted, axis=1).tolist() == labels.tolist()


def test_a_class_prior_tie_keeps_the_configured_weight_then_the_larger():
    separable = np.array([[0.99, 0.01], [0.01, 0.99]])  # every weight decides both rows right
    labels, train_labels = np.array([0, 1]), np.array([0, 0, 0, 1])
    assert best_class_prior(separable, labels, train_labels, "balanced", configured=0.25) == 0.25
    assert best_class_prior(separable, labels, train_labels, "balanced", configured=0.3) == 0.3
    flat = np.full((2, 2), 0.5)  # both rows tie whatever the weight: 1 of 2 right
    assert best_class_prior(flat, np.array([0, 0]), train_labels, "balanced", configured=1.0) == 1.0


def test_between_two_classes_the_threshold_may_leave_the_grid_for_answer_scores_beyond_it():
    """A verbalizer member that leans to class 1 for every row (score differences 1.6-2.3) but ranks them:
    no weight in [0, 1] answers class 0 for any row, a cut on the whole line separates the classes."""
    train_labels = np.array([0, 0, 1] * 6)  # prior 2:1: a weight of 1 lowers class 1's log odds by 0.69
    labels = np.array([0, 0, 0, 0, 1, 1])
    differences = np.array([1.6, 1.7, 1.8, 1.9, 2.2, 2.3])  # log p1 - log p0 as trained
    probabilities = np.stack([np.ones(6), np.exp(differences)], axis=1)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    log_prior = np.log([2 / 3, 1 / 3])
    decide = lambda weight: np.argmax(np.log(probabilities) + weight * log_prior, axis=1)  # noqa: E731
    assert all(decide(weight).tolist() == [1] * 6 for weight in PRIOR_WEIGHTS)  # the grid: 2 of 6 right
    weight = best_class_prior(probabilities, labels, train_labels, "balanced", configured=1.0)
    assert decide(weight).tolist() == labels.tolist()
    # the cut sits midway between the last negative (1.9) and the first positive (2.2)
    assert weight * np.log(2) == pytest.approx(2.05)
    assert best_class_prior(probabilities, labels, train_labels, "balanced", 1.0, whole_line=False) == 1.0
    # among the cuts that decide as well, the one nearest the configured weight; the grid wins ties
    assert best_class_prior(probabilities, np.ones(6, dtype=int), train_labels, "balanced", configured=1.0) == 1.0
    # three classes: the grid alone
    three = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    assert best_class_prior(three, np.array([0, 2]), np.array([0, 0, 1, 2]), "balanced", 1.0) in PRIOR_WEIGHTS


def test_a_tuned_weight_beyond_the_grid_moves_the_bias_like_any_other():
    head = torch.nn.Linear(4, 2)
    torch.nn.init.constant_(head.bias, 0.0)
    adjust_class_prior(head, np.array([0, 0, 1]), 2, "balanced", 2.5)
    np.testing.assert_allclose(head.bias.detach().numpy(), 2.5 * np.log([2 / 3, 1 / 3]), rtol=1e-6)


def test_a_member_tunes_its_class_prior_on_the_validation_rows_and_keeps_it_in_its_head(parts):
    tokenizer, base = parts
    labels = np.array([0, 0, 0, 1] * 4)
    rows = encode(tokenizer, TEXTS * 4, labels, 64)
    settings = TrainSettings(epochs=2, batch_size=4)
    tuned = EnsembleTrainer(base, 2, settings, rows, rows).train_member(3)
    fixed = EnsembleTrainer(base, 2, replace(settings, tune_class_prior=False), rows).train_member(3)
    trainer = EnsembleTrainer(base, 2, settings, rows)
    p_tuned, p_fixed = (trainer.predict_proba(m.classifier, rows) for m in (tuned, fixed))
    assert fixed.class_prior == 1.0 and tuned.class_prior in PRIOR_WEIGHTS
    # same seed and training: the heads differ by (tuned - 1) x the log prior, so the odds by 3 ** (1 - tuned)
    odds_ratio = (p_tuned[:, 0] / p_tuned[:, 1]) / (p_fixed[:, 0] / p_fixed[:, 1])
    np.testing.assert_allclose(odds_ratio, 3.0 ** (tuned.class_prior - 1.0), rtol=1e-4)
    as_trained = p_fixed * np.exp(-prior_shift(labels, 2, "balanced", 1.0))
    as_trained /= as_trained.sum(axis=1, keepdims=True)
    assert tuned.class_prior == best_class_prior(as_trained, labels, labels, "balanced", 1.0)


def test_class_prior_reads_names_and_weights_and_refuses_the_rest():
    assert class_prior_weight("data") == 1.0 and class_prior_weight(" Uniform ") == 0.0
    assert class_prior_weight("0.4") == 0.4 and class_prior_weight(0.4) == 0.4
    assert TrainSettings(class_prior="uniform").class_prior == 0.0
    for bad in ("majority", "1.5", -0.1, float("nan"), True, None):
        with pytest.raises(TabconsInputError, match="class_prior"):
            TrainSettings(class_prior=bad)
    with pytest.raises(TabconsInputError, match="tune_class_prior must be true or false"):
        TrainSettings(tune_class_prior="no")


def test_bfloat16_training_learns_the_same_member_up_to_rounding(parts):
    tokenizer, base = parts
    rows = encode(tokenizer, TEXTS * 4, np.array([0, 1, 0, 1] * 4), 64)
    settings = dict(epochs=3, batch_size=4, learning_rate=5e-3, head_learning_rate=2e-2, head_dropout=0.0)
    trainers = {p: EnsembleTrainer(base, 2, TrainSettings(precision=p, **settings), rows) for p in ("float32", "bfloat16")}
    members = {p: trainer.train_member(1) for p, trainer in trainers.items()}
    full, half = (trainers[p].predict_proba(members[p].classifier, rows) for p in ("float32", "bfloat16"))
    assert all(p.dtype == torch.float32 for p in members["bfloat16"].classifier.parameters())
    assert members["bfloat16"].history[-1]["train_loss"] < members["bfloat16"].history[0]["train_loss"]
    np.testing.assert_allclose(half, full, atol=0.05)
    assert not np.array_equal(half, full)  # autocast really ran in bfloat16


def test_cached_prefix_and_plain_training_agree_without_dropout(parts, tiny_model_dir):
    """The cache is an optimisation: with dropout off it must train the same member."""
    tokenizer, _ = parts
    base = load_base_model(tiny_model_dir)
    for module in base.backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rows = encode(tokenizer, TEXTS * 2, np.array([0, 1, 0, 1] * 2), 64)
    lora = LoraSettings(layers=2, dropout=0.0)
    kwargs = dict(epochs=2, batch_size=4, lora=lora, head_dropout=0.0, attention_dropout=None)
    cached = EnsembleTrainer(base, 2, TrainSettings(cache_prefix=True, **kwargs), rows)
    plain = EnsembleTrainer(base, 2, TrainSettings(cache_prefix=False, **kwargs), rows)
    assert cached.depth == 2 and plain.depth == 0
    p_cached = cached.predict_proba(cached.train_member(5).classifier, rows)
    p_plain = plain.predict_proba(plain.train_member(5).classifier, rows)
    np.testing.assert_allclose(p_cached, p_plain, atol=1e-4)


def test_save_and_load_round_trip(parts, tmp_path):
    tokenizer, base = parts
    classifier = build_classifier(base, 2, lora=LoraSettings(), seed=3).eval()
    with torch.no_grad():  # make the adapters non-trivial so merging matters
        for name, parameter in classifier.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    ids, mask = pad(encode(tokenizer, TEXTS, None, 64).input_ids)
    save_classifier(classifier, tmp_path / "m", ClassifierSpec(num_labels=2))
    loaded, spec = load_classifier(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), classifier(ids, mask), atol=1e-5, rtol=1e-4)
    assert spec.num_labels == 2 and not any("lora_" in n for n, _ in loaded.named_parameters())


def test_unknown_model_is_a_clear_error():
    with pytest.raises(TabconsInputError, match="cannot load model '/no/such/model'.*minilm"):
        load_tokenizer("/no/such/model")


def test_attention_dropout_is_rebuilt_with_the_same_weights(parts):
    tokenizer, base_model = parts
    base = base_model.backbone
    assert base.config.attention_probs_dropout_prob == pytest.approx(0.1)
    quiet = with_attention_dropout(base, 0.0)
    assert quiet is not base and quiet.config.attention_probs_dropout_prob == 0.0
    assert base.config.attention_probs_dropout_prob == pytest.approx(0.1)  # the shared base is untouched
    assert with_attention_dropout(quiet, 0.0) is quiet and with_attention_dropout(base, None) is base
    ids, mask = pad(encode(tokenizer, TEXTS, None, 64).input_ids)
    with torch.no_grad():
        torch.testing.assert_close(quiet.eval()(ids, attention_mask=mask).last_hidden_state,
                                   base.eval()(ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(TabconsInputError, match="attention_dropout"):
        with_attention_dropout(base, 1.5)
