"""The recipe step of the `main` job: search (or reuse) the members' recipe and log it (docs/recipe.md).

Each trial is logged as it finishes (metrics stepped by trial number, and a
progress line); the trials end up as the table ``tabcons/recipe_trials.json``
and the choice as ``recipe.*`` parameters of the parent run, plus
``tabcons/recipe.json`` that ``--resume`` reads instead of searching again.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow_tabcons.members.classifier import BaseModel

from mlflow_tabcons.members.recipe import RecipeChoice, SearchSettings, Trial, search_recipe
from mlflow_tabcons.tracking import resume
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.tracking.prepared import PreparedData, number_styles, with_numbers

logger = logging.getLogger(__name__)

TRIALS_ARTIFACT = "tabcons/recipe_trials.json"


def trials_table(trials: list[Trial]) -> pd.DataFrame:
    """One row per trial: what changed, the settings that matter, validation scores, seconds."""
    return pd.DataFrame(
        [
            {
                "trial": i,
                "change": t.name,
                "numbers": t.numbers,
                "learning_rate": t.settings.learning_rate,
                "head_learning_rate": t.settings.head_learning_rate,
                "class_weight": t.settings.class_weight,
                "lora_rank": t.settings.lora.rank,
                "lora_layers": t.settings.lora.layers or 0,
                "best_epoch": t.best_epoch,
                "val_auroc": t.val_auroc,
                "val_accuracy": t.val_accuracy,
                "val_loss": t.val_loss,
                "seconds": t.seconds,
                "error": t.error,
            }
            for i, t in enumerate(trials, start=1)
        ]
    )


def _report_trial(trial: Trial, done: int, planned: int) -> None:
    logger.info(
        "recipe trial %d/%d (%s, numbers %s): validation AUROC %.3f, accuracy %.3f, best epoch %d, %.0f s",
        done, planned, trial.name, trial.numbers, trial.val_auroc, trial.val_accuracy, trial.best_epoch, trial.seconds,
    )
    metrics = {"recipe_val_auroc": trial.val_auroc, "recipe_val_accuracy": trial.val_accuracy, "recipe_val_loss": trial.val_loss}
    mlflow.log_metrics({k: v for k, v in metrics.items() if v == v}, step=done)


def log_choice(choice: RecipeChoice, effective: TrainingConfig) -> None:
    """The chosen recipe as parameters, the trials as a table, and the choice for a later resume."""
    chosen = {f"recipe.{key}": value for key, value in effective.params().items() if key.startswith("train.")}
    logged = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in {**chosen, "recipe.numbers": choice.numbers}.items() if k not in logged})
    mlflow.log_metrics({"seconds_recipe_search": choice.seconds, "recipe_trials": len(choice.trials)})
    mlflow.log_table(trials_table(choice.trials), TRIALS_ARTIFACT)
    resume.log_recipe(choice.settings, choice.numbers)


def choose_recipe(
    config: TrainingConfig,
    data: PreparedData,
    base_model: BaseModel,
    *,
    device: str = "cpu",
    resumed: Run | None = None,
) -> tuple[TrainingConfig, PreparedData]:
    """The configuration and rows the members train with.

    ``--recipe fixed`` keeps ``config`` as it is. ``--recipe auto`` reuses the
    recipe a resumed run chose, or searches one on the validation rows.
    """
    if config.recipe == "fixed":
        return config, data
    stored = resume.stored_recipe(resumed) if resumed is not None else None
    if stored is not None:
        settings, numbers = stored
        logger.info("reusing the recipe the run chose before it was interrupted (numbers %s)", numbers)
        return replace(config, train=settings, numbers=numbers), with_numbers(data, config, numbers)
    styles = number_styles(config, data.dataset)
    prepared = {style: with_numbers(data, config, style) for style in styles}
    search = SearchSettings(budget=config.recipe_budget)
    logger.info(
        "choosing the members' recipe on %d validation rows: at most %d trials x %d search seeds, up to %d epochs each",
        len(data.validation), search.budget, len(search.seeds), config.train.epochs,
    )
    choice = search_recipe(
        base_model,
        len(data.dataset.labels),
        config.train,
        {style: (rows.train, rows.validation) for style, rows in prepared.items()},
        search,
        device=device,
        answer_ids=data.answer_ids,
        on_trial=_report_trial,
    )
    effective = replace(config, train=choice.settings, numbers=choice.numbers)
    log_choice(choice, effective)
    return effective, prepared[choice.numbers]
