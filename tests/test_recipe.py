"""The recipe search: a budgeted greedy walk on validation rows, early stopping, one recipe per ensemble."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.classifier import load_base_model, load_tokenizer
from mlflow_tabcons.members.recipe import STEPS, SearchSettings, Trial, planned_trials, search_recipe
from mlflow_tabcons.members.training import DEFAULT_RATES, EnsembleTrainer, TrainSettings, balanced_class_weights, encode
from mlflow_tabcons.metrics.classification import log_loss

TEXTS = ["colour: red. size: 3 (high).", "colour: blue. size: 1 (low).", "colour: red. size: 2 (medium).", "colour: blue. size: 3 (high)."]
PLAIN = ["colour: red. size: 3.", "colour: blue. size: 1.", "colour: red. size: 2.", "colour: blue. size: 3."]
LABELS = np.array([1, 0, 1, 0] * 4)


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    return load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir)


def _rows(tokenizer, texts):
    rows = encode(tokenizer, texts * 4, LABELS, 64)
    return rows, rows


def test_returning_true_from_on_epoch_stops_training(parts):
    tokenizer, base = parts
    train, validation = _rows(tokenizer, TEXTS)
    trainer = EnsembleTrainer(base, 2, TrainSettings(epochs=5, batch_size=4), train, validation)
    member = trainer.train_member(0, on_epoch=lambda record: record["epoch"] >= 2)
    assert [h["epoch"] for h in member.history] == [1.0, 2.0]
    assert "val_loss" in member.history[0] and member.history[0]["val_loss"] > 0


def test_a_member_stopped_early_on_a_longer_schedule_repeats_that_trajectory(parts):
    """epochs=2 of a 5-epoch schedule trains exactly like the first two epochs of 5: what the search's trial saw."""
    tokenizer, base = parts
    train, validation = _rows(tokenizer, TEXTS)

    def history(**settings):
        trainer = EnsembleTrainer(base, 2, TrainSettings(batch_size=4, head_dropout=0.0, **settings), train, validation)
        return [loss for h in trainer.train_member(3).history for loss in (h["train_loss"], h["val_loss"])]

    full, stopped, squeezed = history(epochs=5), history(epochs=2, schedule_epochs=5), history(epochs=2)
    assert stopped == pytest.approx(full[:4], rel=1e-5)
    assert squeezed[2:] != pytest.approx(full[2:4], rel=1e-5)  # a 2-epoch schedule decays sooner: another trajectory
    with pytest.raises(TabconsInputError, match="schedule_epochs"):
        TrainSettings(epochs=8, schedule_epochs=4)


@pytest.mark.parametrize("class_weight", ["balanced", "none"])
def test_early_stopping_watches_the_loss_training_minimizes(parts, class_weight):
    """A balanced head's plain log loss on imbalanced rows rises as it leaves the uniform prior: not the objective."""
    tokenizer, base = parts
    labels = np.array([1, 1, 1, 0] * 4)  # 75/25: weighting changes the loss
    rows = encode(tokenizer, TEXTS * 4, labels, 64)
    # class_prior equal to what the loss trains for, so the head is left as trained
    settings = TrainSettings(epochs=2, batch_size=4, class_weight=class_weight, tune_class_prior=False,
                             class_prior="uniform" if class_weight == "balanced" else "data")
    trainer = EnsembleTrainer(base, 2, settings, rows, rows)
    member = trainer.train_member(0)
    probabilities = trainer.predict_proba(member.classifier, rows)
    weights = balanced_class_weights(labels, 2).numpy()[labels] if class_weight == "balanced" else None
    expected = log_loss(labels, probabilities, sample_weight=weights)
    assert member.history[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
    if class_weight == "balanced":
        assert expected != pytest.approx(log_loss(labels, probabilities), rel=1e-3)


def test_search_spends_its_budget_and_returns_the_best_trial(parts):
    tokenizer, base = parts
    seen = []
    choice = search_recipe(
        base, 2, TrainSettings(epochs=3, batch_size=4),
        {"words": _rows(tokenizer, TEXTS), "plain": _rows(tokenizer, PLAIN)},
        SearchSettings(budget=4, seeds=(7,)),
        on_trial=lambda trial, done, planned: seen.append((trial.name, done, planned)),
    )
    assert [(done, planned) for _, done, planned in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [t.numbers for t in choice.trials[:2]] == ["words", "plain"]
    assert [t.name for t in choice.trials[2:]] == [name for name, _ in STEPS[:2]]
    best = choice.trials[0]
    for trial in choice.trials[1:]:
        best = trial if trial.improves_on(best, SearchSettings().min_gain) else best
    assert choice.numbers == best.numbers
    assert choice.settings == replace(best.settings, epochs=best.best_epoch, schedule_epochs=best.settings.epochs)
    assert 1 <= choice.settings.epochs <= 3
    # each step changes the recipe it starts from in one respect
    assert choice.trials[2].settings.lora.layers is None and choice.trials[0].settings.lora.layers == 3
    assert choice.trials[2].settings.learning_rate == choice.trials[0].settings.learning_rate
    assert choice.trials[3].settings.learning_rate == pytest.approx(3 * choice.trials[0].settings.learning_rate)


# validation loss lowest at epoch 2, ranking best at epoch 4: the shape of credit-g's curves
SCRIPTED_EPOCHS = [
    {"val_loss": 0.69, "val_auroc": 0.55, "val_accuracy": 0.70},
    {"val_loss": 0.67, "val_auroc": 0.60, "val_accuracy": 0.70},
    {"val_loss": 0.68, "val_auroc": 0.64, "val_accuracy": 0.70},
    {"val_loss": 0.70, "val_auroc": 0.66, "val_accuracy": 0.72},
    {"val_loss": 0.71, "val_auroc": 0.65, "val_accuracy": 0.71},
    {"val_loss": 0.72, "val_auroc": 0.65, "val_accuracy": 0.71},
    {"val_loss": 0.73, "val_auroc": 0.70, "val_accuracy": 0.75},  # never reached with patience 2
]


def test_trials_stop_and_choose_epochs_by_validation_auroc_not_loss(monkeypatch):
    from mlflow_tabcons.members.recipe import run_trial

    ran = []

    def scripted(self, seed, *, on_epoch):
        for epoch, record in enumerate(SCRIPTED_EPOCHS, start=1):
            ran.append((seed, epoch))
            if on_epoch({"epoch": float(epoch), **record}):
                break

    monkeypatch.setattr(EnsembleTrainer, "__init__", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(EnsembleTrainer, "train_member", scripted)
    search = SearchSettings(seeds=(1, 2), patience=2)
    auroc, accuracy, loss, best_epoch = run_trial(None, 2, TrainSettings(epochs=7), (None, None), search)
    assert ran == [(seed, epoch) for seed in (1, 2) for epoch in range(1, 7)]  # patience 2: stopped after epoch 6
    assert (best_epoch, auroc, accuracy, loss) == (4, 0.66, 0.72, 0.70)


def test_a_step_back_to_a_recipe_already_tried_reuses_its_scores(monkeypatch):
    """x3 wins, then /3 leads back to the configured recipe: reported again, not trained again."""
    from mlflow_tabcons.members import recipe

    trained = []

    def fake_trial(base_model, num_labels, settings, rows, search, **kwargs):
        trained.append(settings)
        return (0.70 if settings.learning_rate > 2e-3 else 0.60), 0.7, 0.5, 3

    monkeypatch.setattr(recipe, "run_trial", fake_trial)
    configured = TrainSettings(epochs=4)
    choice = search_recipe(_model_of_depth(6), 2, configured, {"plain": ([0], [0])}, SearchSettings(budget=100))
    assert [t.name for t in choice.trials][-1] == "learning rates /3 (= as configured)"
    assert len(trained) == len(choice.trials) - 1 and configured.for_head("linear") in trained
    first, last = choice.trials[0], choice.trials[-1]
    assert (last.settings, last.val_auroc, last.best_epoch, last.seconds) == (first.settings, first.val_auroc, 3, 0.0)
    assert choice.settings.learning_rate == pytest.approx(3 * DEFAULT_RATES["linear"][0])
    assert (choice.settings.epochs, choice.settings.schedule_epochs) == (3, 4)  # stopped at the best epoch of 4


def _model_of_depth(layers, family="encoder"):
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers), family=family)


@pytest.mark.parametrize("family, head, rates", [("encoder", "auto", (1e-3, 3e-3)), ("decoder", "auto", (1e-2, 1e-2)),
                                                 ("encoder-decoder", "auto", (1e-2, 1e-2)), ("decoder", "linear", (1e-3, 3e-3))])
def test_the_search_starts_from_the_heads_default_rates_unless_rates_are_given(monkeypatch, family, head, rates):
    """A verbalizer member starts at 1e-2 (its answer rows barely move at a linear head's 1e-3); given rates win."""
    from mlflow_tabcons.members import recipe

    tried = []
    monkeypatch.setattr(recipe, "run_trial", lambda base_model, n, settings, *a, **k: tried.append(settings) or (0.6, 0.7, 0.5, 3))
    choice = search_recipe(_model_of_depth(6, family), 2, TrainSettings(head=head), {"plain": ([0], [0])}, SearchSettings(budget=3))
    assert (tried[0].learning_rate, tried[0].head_learning_rate) == rates
    assert choice.trials[2].name == "learning rates x3"
    assert tried[2].learning_rate == pytest.approx(3 * rates[0])  # the step scales the resolved rates
    search_recipe(_model_of_depth(6, family), 2, TrainSettings(head=head, learning_rate=2e-3), {"plain": ([0], [0])},
                  SearchSettings(budget=1))
    assert (tried[3].learning_rate, tried[3].head_learning_rate) == (2e-3, rates[1])


@pytest.mark.parametrize(("depth", "more_layers", "larger"), [(30, 6, 12), (12, 6, None), (6, None, None), (None, 6, 12)])
def test_layer_steps_double_the_adapted_layers_up_to_the_models_depth(monkeypatch, depth, more_layers, larger):
    """A deep model gets twice the top layers, not every layer: every layer has no frozen prefix to reuse."""
    from mlflow_tabcons.members import recipe

    def fake_trial(base_model, num_labels, settings, rows, search, **kwargs):  # more layers win, nothing else does
        return (0.6 if settings.lora.layers == 3 else 0.7), 0.7, 0.5, 3

    monkeypatch.setattr(recipe, "run_trial", fake_trial)
    configured = TrainSettings(epochs=4)  # LoRA rank 8 on the top 3 layers
    choice = search_recipe(_model_of_depth(depth), 2, configured, {"plain": ([0], [0])}, SearchSettings(budget=100))
    by_name = {t.name.split(" (=")[0]: t.settings.lora for t in choice.trials}
    assert (by_name["LoRA on twice the top layers"].layers, by_name["LoRA on twice the top layers"].rank) == (more_layers, 8)
    assert (by_name["LoRA rank and layers x2"].layers, by_name["LoRA rank and layers x2"].rank) == (larger, 16)
    assert (choice.settings.lora.layers, choice.settings.lora.rank) == (more_layers, 8)


def test_best_index_falls_back_to_the_loss_where_auroc_is_undefined():
    from mlflow_tabcons.members.recipe import best_index

    nan = float("nan")
    history = [{"epoch": 1.0, "val_loss": 0.6, "val_auroc": nan}, {"epoch": 2.0, "val_loss": 0.5, "val_auroc": nan}]
    assert history[best_index(history)]["epoch"] == 2.0
    history.append({"epoch": 3.0, "val_loss": 0.9, "val_auroc": 0.51})
    assert history[best_index(history)]["epoch"] == 3.0


def test_a_change_is_kept_only_for_a_gain_beyond_the_noise():
    settings = TrainSettings()
    low = Trial("a", "plain", settings, 0.60, 0.7, 0.5, 3, 1.0)
    high = Trial("b", "plain", settings, 0.70, 0.6, 0.9, 3, 1.0)
    slightly_higher_lower_loss = Trial("c", "plain", settings, 0.605, 0.7, 0.4, 3, 1.0)
    failed = Trial("d", "plain", settings, float("nan"), float("nan"), float("nan"), 0, 1.0, "OutOfMemoryError: ...")
    assert high.improves_on(low, 0.01) and not low.improves_on(high, 0.01)
    # within the margin the incumbent stays, whatever the loss says
    assert not slightly_higher_lower_loss.improves_on(low, 0.01)
    assert slightly_higher_lower_loss.improves_on(low, 0.0)
    assert low.improves_on(failed) and not failed.improves_on(low)


def test_budget_caps_the_trials():
    assert planned_trials(["words", "plain"], 3) == 3
    assert planned_trials(["plain"], 100) == 1 + len(STEPS)


def test_bad_search_input_is_named(parts):
    tokenizer, base = parts
    with pytest.raises(TabconsInputError, match="budget"):
        SearchSettings(budget=0)
    with pytest.raises(TabconsInputError, match="min_gain"):
        SearchSettings(min_gain=-0.1)
    with pytest.raises(TabconsInputError, match="validation rows"):
        search_recipe(base, 2, TrainSettings(), {"plain": (_rows(tokenizer, TEXTS)[0], None)})
    with pytest.raises(TabconsInputError, match="number style"):
        search_recipe(base, 2, TrainSettings(), {})


def test_number_styles_follow_the_recipe_mode_and_the_data_dictionary():
    import pandas as pd

    from mlflow_tabcons.data.serialize import DataDictionary
    from mlflow_tabcons.data.tables import TabularDataset
    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.prepared import number_styles

    frame = pd.DataFrame({"age": [1, 2], "y": [0, 1]})
    plain_table = TabularDataset("t", frame, "y")
    described = TabularDataset("t", frame, "y", DataDictionary.from_dict({"age": "age in years"}))
    auto, fixed = TrainingConfig(register=None), TrainingConfig(register=None, recipe="fixed")
    assert number_styles(auto, plain_table) == ("words", "plain")  # the search tries both, the default first
    assert number_styles(auto, described) == ("plain", "words")
    assert number_styles(fixed, plain_table) == ("words",) and number_styles(fixed, described) == ("plain",)
    assert number_styles(TrainingConfig(register=None, numbers="plain"), plain_table) == ("plain",)
    with pytest.raises(TabconsInputError, match="recipe"):
        TrainingConfig(recipe="grid")
    with pytest.raises(TabconsInputError, match="numbers"):
        TrainingConfig(numbers="roman")


def test_a_failing_trial_is_skipped_and_never_chosen(parts, monkeypatch):
    tokenizer, base = parts
    original = EnsembleTrainer.train_member

    def fails_at_high_rates(self, seed, **kwargs):
        if self.settings.learning_rate > 2e-3:
            raise RuntimeError("simulated out-of-memory")
        return original(self, seed, **kwargs)

    monkeypatch.setattr(EnsembleTrainer, "train_member", fails_at_high_rates)
    choice = search_recipe(base, 2, TrainSettings(epochs=2, batch_size=4), {"plain": _rows(tokenizer, PLAIN)},
                           SearchSettings(budget=3, seeds=(7,)))
    assert choice.trials[2].name == "learning rates x3" and not choice.trials[1].error
    assert choice.trials[2].error == "RuntimeError: simulated out-of-memory"
    assert choice.settings.learning_rate == DEFAULT_RATES["linear"][0]


def test_when_every_trial_fails_the_configured_recipe_stands(parts, monkeypatch):
    tokenizer, base = parts

    def broken(self, seed, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(EnsembleTrainer, "train_member", broken)
    configured = TrainSettings(epochs=2, batch_size=4)
    choice = search_recipe(base, 2, configured, {"plain": _rows(tokenizer, PLAIN)}, SearchSettings(budget=2, seeds=(7,)))
    assert choice.settings == configured.for_head("linear") and all(t.error for t in choice.trials)
