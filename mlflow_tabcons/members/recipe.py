"""One training recipe per ensemble, chosen on the table's own validation rows (docs/recipe.md).

Defaults tuned on one table can leave members on another table no better
than the majority class. ``search_recipe`` tries a few recipes (a greedy,
budgeted walk: serialization of numbers, learning rates, LoRA size, class
weighting), each trained with a couple of search seeds that no member uses,
with early stopping on the validation AUROC, and returns the best as a
``TrainSettings`` (epochs set to where the validation AUROC peaked, on the
trial's learning-rate schedule) and a number style. Every member of the
ensemble then trains with that one recipe, so recipe choice is never confused
with seed multiplicity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from mlflow_tabcons.errors import TabconsInputError, check_float, check_int
from mlflow_tabcons.members.classifier import BaseModel, LoraSettings, resolve_head
from mlflow_tabcons.members.families import num_layers
from mlflow_tabcons.members.training import EncodedRows, EnsembleTrainer, TrainSettings

logger = logging.getLogger(__name__)

RECIPE_MODES = ("auto", "fixed")
# One step of the greedy walk: the recipe to try next, from the best so far and the model's layer count.
Step = Callable[[TrainSettings, int | None], TrainSettings]
# Search seeds are far from the members' seeds (0, 1, ...): the recipe is not fit to the members themselves.
SEARCH_SEEDS = (10_000, 10_001)


@dataclass(frozen=True)
class SearchSettings:
    """How much the search may spend: ``budget`` recipes, each trained once per search seed."""

    budget: int = 7
    seeds: tuple[int, ...] = SEARCH_SEEDS
    # epochs without a higher validation AUROC before a trial stops: on ~150 validation rows the AUROC
    # dips for two epochs and climbs again (credit-g, LoRA on every layer: best at epoch 8 after dips at 5-6)
    patience: int = 3
    # A change is kept only when it gains more validation AUROC than this. On the ~100 validation
    # rows of a few-shot split, recipes that are the same in effect differ by about 0.005; chasing
    # such gains picked recipes whose members then tied the majority rate (docs/recipe.md).
    min_gain: float = 0.01

    def __post_init__(self) -> None:
        check_int("recipe budget", self.budget, minimum=1, maximum=100)
        check_int("recipe patience", self.patience, minimum=1)
        check_float("recipe min_gain", self.min_gain, low=0.0, high=1.0)
        if not self.seeds:
            raise TabconsInputError("the recipe search needs at least one seed")


@dataclass(frozen=True)
class Trial:
    """One recipe tried: what changed, its settings, and how it did on the validation rows."""

    name: str
    numbers: str
    settings: TrainSettings
    val_auroc: float  # mean over search seeds, at each seed's best epoch
    val_accuracy: float
    val_loss: float
    best_epoch: int  # mean best epoch over search seeds, rounded
    seconds: float
    error: str = ""  # why the trial failed; a failed trial is never chosen

    def improves_on(self, incumbent: Trial, min_gain: float = 0.0) -> bool:
        """Validation AUROC (independent of the class prior the head is trained for) higher by more than ``min_gain``.

        Anything less keeps the incumbent: the earlier recipe, closer to the configured one.
        """
        if self.error or incumbent.error:
            return not self.error and bool(incumbent.error)
        return self.val_auroc > incumbent.val_auroc + min_gain


@dataclass(frozen=True)
class RecipeChoice:
    """The search's answer: member settings, number style, and every trial in order."""

    settings: TrainSettings
    numbers: str
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0


def _scaled_rates(factor: float) -> Step:
    def scaled(rate: float) -> float:
        return float(f"{rate * factor:.6g}")  # 0.009, not 0.009000000000000001, in the logged parameters

    return lambda s, depth: replace(s, learning_rate=scaled(s.learning_rate), head_learning_rate=scaled(s.head_learning_rate))


def _flipped_weighting(settings: TrainSettings, depth: int | None) -> TrainSettings:
    return replace(settings, class_weight="none" if settings.class_weight == "balanced" else "balanced")


def _doubled_layers(lora: LoraSettings, depth: int | None) -> int | None:
    """Twice the adapted top layers, or None (every layer) once that reaches the model's depth."""
    if lora.layers is None or (depth is not None and 2 * lora.layers >= depth):
        return None
    return 2 * lora.layers


def _more_layers(settings: TrainSettings, depth: int | None) -> TrainSettings:
    """Adapters on twice the top layers: long rows (credit-g's) need more than the top 3 to learn at 128 shots.

    On MiniLM's 6 layers that is every layer. Doubling rather than going straight to every layer keeps
    the frozen-prefix cache on a deep model: with LoRA on all 30 of SmolLM2's layers each epoch runs 30
    layers forward and backward instead of 3.
    """
    return replace(settings, lora=replace(settings.lora, layers=_doubled_layers(settings.lora, depth)))


def _larger_lora(settings: TrainSettings, depth: int | None) -> TrainSettings:
    """Twice the rank, on twice the top layers (all of them when the adapters already cover every layer)."""
    lora = settings.lora
    return replace(settings, lora=replace(lora, rank=2 * lora.rank, layers=_doubled_layers(lora, depth)))


# The greedy walk, in order: each step changes the current best recipe in one respect, knowing the model's depth.
STEPS: tuple[tuple[str, Step], ...] = (
    ("LoRA on twice the top layers", _more_layers),
    ("learning rates x3", _scaled_rates(3.0)),
    ("class weighting flipped", _flipped_weighting),
    ("LoRA rank and layers x2", _larger_lora),
    ("learning rates /3", _scaled_rates(1 / 3)),
)


def planned_trials(numbers: Sequence[str], budget: int) -> int:
    """How many trials the search will run: one per number style, then the greedy steps, within ``budget``."""
    return min(budget, len(numbers) + len(STEPS))


def best_index(history: Sequence[Mapping[str, float]]) -> int:
    """Where in ``history`` the validation AUROC is highest (the first of equals; the lowest loss when AUROC is undefined).

    Not the lowest validation loss: on credit-g the loss bottomed out after 4-5 epochs while the
    ranking kept improving, and members trained that short answered the majority class for every row.
    """
    auroc = np.array([r["val_auroc"] for r in history], dtype=float)
    if np.isfinite(auroc).any():
        return int(np.nanargmax(auroc))
    return int(np.argmin([r["val_loss"] for r in history]))


def run_trial(
    base_model: BaseModel,
    num_labels: int,
    settings: TrainSettings,
    rows: tuple[EncodedRows, EncodedRows],
    search: SearchSettings,
    *,
    device: str = "cpu",
    answer_ids: Sequence[int] | None = None,
) -> tuple[float, float, float, int]:
    """Train ``settings`` once per search seed with early stopping; mean validation AUROC, accuracy, loss, best epoch."""
    train, validation = rows
    trainer = EnsembleTrainer(base_model, num_labels, settings, train, validation, device=device, answer_ids=answer_ids)
    bests = []
    for seed in search.seeds:
        history: list[dict[str, float]] = []

        def stop(record: dict[str, float]) -> bool:
            history.append(record)
            return len(history) - 1 - best_index(history) >= search.patience

        trainer.train_member(seed, on_epoch=stop)
        bests.append(history[best_index(history)])
    auroc = np.array([b["val_auroc"] for b in bests], dtype=float)
    return (
        float(np.nanmean(auroc)) if np.isfinite(auroc).any() else float("nan"),
        float(np.mean([b["val_accuracy"] for b in bests])),
        float(np.mean([b["val_loss"] for b in bests])),
        max(1, int(round(np.mean([b["epoch"] for b in bests])))),
    )


def search_recipe(
    base_model: BaseModel,
    num_labels: int,
    base: TrainSettings,
    rows_by_numbers: Mapping[str, tuple[EncodedRows, EncodedRows]],
    search: SearchSettings | None = None,
    *,
    device: str = "cpu",
    answer_ids: Sequence[int] | None = None,
    on_trial: Callable[[Trial, int, int], None] | None = None,
) -> RecipeChoice:
    """Choose member settings and number style on the validation rows.

    ``rows_by_numbers`` maps each number style to its (training, validation)
    rows serialized that way. ``base.epochs`` is the most epochs a trial may
    train; the chosen settings train for the epochs where the validation AUROC
    was highest. ``on_trial(trial, done, planned)`` reports progress.
    """
    search = search or SearchSettings()
    base = base.for_head(resolve_head(base.head, base_model.family))  # the steps scale concrete learning rates
    if not rows_by_numbers:
        raise TabconsInputError("the recipe search needs the rows serialized in at least one number style")
    for style, (_, validation) in rows_by_numbers.items():
        if validation is None or len(validation) == 0:
            raise TabconsInputError(f"the recipe search needs validation rows (number style {style!r} has none)")
    planned = planned_trials(list(rows_by_numbers), search.budget)
    started = time.perf_counter()
    trials: list[Trial] = []
    progress = tqdm(total=planned, desc="recipe search", unit="trial", leave=False, disable=None)
    tried: dict[tuple[str, TrainSettings], Trial] = {}

    def attempt(name: str, numbers: str, settings: TrainSettings) -> Trial:
        earlier = tried.get((numbers, settings))
        if earlier is not None:  # a step back to a recipe already trained (x3, then /3): its scores, no retraining
            return record(replace(earlier, name=f"{name} (= {earlier.name})", seconds=0.0))
        begun = time.perf_counter()
        try:
            scores = run_trial(base_model, num_labels, settings, rows_by_numbers[numbers], search, device=device, answer_ids=answer_ids)
            trial = Trial(name, numbers, settings, *scores, time.perf_counter() - begun)
        except Exception as error:  # a recipe that cannot train (out of memory, ...) is skipped, not fatal
            logger.exception("recipe trial %r failed", name)
            nan = float("nan")
            trial = Trial(name, numbers, settings, nan, nan, nan, 0, time.perf_counter() - begun, f"{type(error).__name__}: {error}")
        tried[(numbers, settings)] = trial
        return record(trial)

    def record(trial: Trial) -> Trial:
        trials.append(trial)
        progress.update(1)
        if on_trial is not None:
            on_trial(trial, len(trials), planned)
        return trial

    best: Trial | None = None
    for numbers in rows_by_numbers:
        if len(trials) >= planned:
            break
        trial = attempt("as configured", numbers, base)
        best = trial if best is None or trial.improves_on(best, search.min_gain) else best
    depth = num_layers(base_model.config)
    for name, change in STEPS:
        if len(trials) >= planned:
            break
        trial = attempt(name, best.numbers, change(best.settings, depth))
        best = trial if trial.improves_on(best, search.min_gain) else best
    progress.close()
    seconds = time.perf_counter() - started
    if best.error:  # nothing trained: the members go with the configured recipe (and fail the same way, with its reason)
        return RecipeChoice(base, next(iter(rows_by_numbers)), trials, seconds)
    # members stop where the trial peaked, on the trial's schedule: its trajectory, not a squeezed one
    schedule = best.settings.schedule_epochs or best.settings.epochs
    chosen = replace(best.settings, epochs=best.best_epoch, schedule_epochs=schedule)
    return RecipeChoice(chosen, best.numbers, trials, seconds)
