"""Click options shared by the commands that train an ensemble (train, evaluate, calibrate).

Each group is declared once here and turned into the library's settings
objects by the matching ``*_from_options`` function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
from mlflow.exceptions import MlflowException

from mlflow_tabcons.scoring.bounds import BOUNDS
from mlflow_tabcons.scoring.consistency import NOISES, PERTURB_SITES, PRECISIONS, SIGMA_MODES, ScorerSettings
from mlflow_tabcons.errors import TabconsInputError, check_int
from mlflow_tabcons.members.admission import MAX_REPLACEMENTS
from mlflow_tabcons.members.training import DEFAULT_RATES, RESAMPLING, TRAIN_PRECISIONS, TrainSettings, class_prior_weight
from mlflow_tabcons.members.classifier import HEADS, LoraSettings
from mlflow_tabcons.members.checkpoints import DEFAULT_MODEL, SMOLLM2
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.flavor.packaged import BACKENDS
from mlflow_tabcons.tracking.config import DEFAULT_REGISTER
from mlflow_tabcons.data.serialize import NUMBER_STYLES, TEMPLATES
from mlflow_tabcons.members.recipe import RECIPE_MODES

_DEFAULT_TRAIN = TrainSettings()
_DEFAULT_LORA = LoraSettings()
_DEFAULT_SCORER = ScorerSettings()
_DEFAULT_CONFIG = TrainingConfig()


def _stack(*decorators: Callable) -> Callable:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def blank_is_none(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    """MLproject passes empty strings for unset optional parameters."""
    return None if value in ("", "none", "None") else value


def blank_or_count(ctx: click.Context, param: click.Parameter, value: Any) -> int | None:
    """A whole number from 0 to ``MAX_REPLACEMENTS``, or None where MLproject passes an empty string for an unset parameter."""
    value = blank_is_none(ctx, param, value)
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number") from None
    try:
        return check_int("the count", count, minimum=0, maximum=MAX_REPLACEMENTS)
    except TabconsInputError as error:
        raise click.BadParameter(str(error)) from None


class ClassPrior(click.ParamType):
    """``data``, ``uniform`` or a weight in [0, 1], as the weight TrainSettings keeps."""

    name = "data|uniform|0-1"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return class_prior_weight(value)
        except TabconsInputError as error:
            self.fail(str(error), param, ctx)


data_options = _stack(
    click.option("--data", default=_DEFAULT_CONFIG.data, show_default=True,
                 help="Built-in dataset (credit-g, diabetes), a CSV/Parquet path, or openml:NAME_OR_ID."),
    click.option("--target", default=None, callback=blank_is_none, help="Column to predict (built-ins know theirs)."),
    click.option("--question", default=None, callback=blank_is_none, help="Task question appended to every row."),
    click.option("--dictionary", default=None, callback=blank_is_none,
                 help="YAML data dictionary: column phrases and code-to-word maps."),
    click.option("--template", type=click.Choice(TEMPLATES), default=_DEFAULT_CONFIG.template, show_default=True,
                 help="Row serialization: 'text' (The age is 42.) or 'compact' (age: 42.)."),
    click.option("--numbers", type=click.Choice(["auto", *NUMBER_STYLES]), default=_DEFAULT_CONFIG.numbers, show_default=True,
                 help="How numbers read: plain (age: 42), words (age: 42 (high), quantiles of the training rows), or auto "
                      "(the recipe search picks; a fixed recipe uses words for a table without a data dictionary)."),
    click.option("--shots", type=int, default=_DEFAULT_CONFIG.shots, show_default=True, help="Training rows per member."),
    click.option("--eval-rows", type=int, default=_DEFAULT_CONFIG.eval_rows, show_default=True,
                 help="Test rows to score (0: all)."),
    click.option("--split-seed", type=int, default=_DEFAULT_CONFIG.split_seed, show_default=True,
                 help="Seed of the train/validation/test split and the few-shot sample."),
)

training_options = _stack(
    click.option("--seeds", type=int, default=_DEFAULT_CONFIG.seeds, show_default=True, help="Ensemble members (>= 2)."),
    click.option("--max-replacements", default=None, callback=blank_or_count,
                 help="Most members that rank the validation rows no better than chance may be replaced by one "
                      "trained with a new seed (0: keep every member as trained).  [default: half the members, at least 1]"),
    click.option("--recipe", type=click.Choice(RECIPE_MODES), default=_DEFAULT_CONFIG.recipe, show_default=True,
                 help="auto: choose learning rates, epochs, LoRA size, class weighting and number style on the "
                      "validation rows, once per ensemble; fixed: train every member with the options as given."),
    click.option("--recipe-budget", type=int, default=_DEFAULT_CONFIG.recipe_budget, show_default=True,
                 help="Recipes the auto search tries (each trained with two search seeds)."),
    click.option("--epochs", type=int, default=_DEFAULT_TRAIN.epochs, show_default=True,
                 help="Training epochs; with --recipe auto, the most a trial trains (early stopping picks fewer)."),
    click.option("--schedule-epochs", type=int, default=None,
                 help="Epochs the learning-rate schedule spans, when training stops before its end [default: --epochs]; "
                      "the recipe search logs its choice as recipe.train.schedule_epochs."),
    click.option("--model", default=_DEFAULT_CONFIG.model, show_default=True,
                 help=f"Hugging Face checkpoint (local dir or hub id): an encoder, decoder or encoder-decoder; "
                      f"'{DEFAULT_MODEL}' is the packaged offline MiniLM-L6, '{SMOLLM2}' the packaged SmolLM2-135M-Instruct."),
    click.option("--head", type=click.Choice(HEADS), default=_DEFAULT_TRAIN.head, show_default=True,
                 help="verbalizer: the language model's scores of the answer words; linear: a fresh linear head; "
                      "auto: the verbalizer for decoders and encoder-decoders, linear for encoders."),
    click.option("--batch-size", type=int, default=_DEFAULT_TRAIN.batch_size, show_default=True),
    click.option("--lr", "learning_rate", type=float, default=None,
                 help=f"Learning rate of the LoRA adapters [default: {DEFAULT_RATES['linear'][0]:g} with a linear head, "
                      f"{DEFAULT_RATES['verbalizer'][0]:g} with the verbalizer]."),
    click.option("--head-lr", "head_learning_rate", type=float, default=None,
                 help=f"Learning rate of the classification head [default: {DEFAULT_RATES['linear'][1]:g} linear, "
                      f"{DEFAULT_RATES['verbalizer'][1]:g} verbalizer]."),
    click.option("--class-weight", type=click.Choice(["balanced", "none"]), default=_DEFAULT_TRAIN.class_weight,
                 show_default=True, help="Weight the loss so every class counts equally (keeps few-shot members off the majority class)."),
    click.option("--class-prior", type=ClassPrior(), default="data", show_default=True,
                 help="Class frequencies the trained members' probabilities assume: the training rows' (data: "
                      "best accuracy), equal (uniform: best balanced accuracy) or a weight between (0-1: 1 is data). "
                      "With --tune-class-prior, where each member's validation rows decide it, the weight a tie keeps."),
    click.option("--tune-class-prior/--no-tune-class-prior", default=_DEFAULT_TRAIN.tune_class_prior, show_default=True,
                 help="Each member chooses its class-prior weight (1, 0.75, 0.5, 0.25, 0) by its accuracy on the "
                      "validation rows: the decision threshold, fitted to the member's own logit scale."),
    click.option("--lora-rank", type=int, default=_DEFAULT_LORA.rank, show_default=True),
    click.option("--lora-alpha", type=float, default=_DEFAULT_LORA.alpha, show_default=True),
    click.option("--lora-dropout", type=float, default=_DEFAULT_LORA.dropout, show_default=True),
    click.option("--lora-modules", default=",".join(_DEFAULT_LORA.target_modules), callback=blank_is_none,
                 help="Comma-separated module names LoRA wraps (default: peft's for the model type)."),
    click.option("--lora-layers", type=int, default=_DEFAULT_LORA.layers, show_default=True,
                 help="Wrap only the top N layers (0: all); the frozen layers below are computed once."),
    click.option("--attention-dropout", type=float, default=_DEFAULT_TRAIN.attention_dropout, show_default=True,
                 help="Dropout on attention probabilities while training (-1: the checkpoint's own)."),
    click.option("--resample", type=click.Choice(RESAMPLING), default=_DEFAULT_TRAIN.resample, show_default=True,
                 help="Vary each member's training rows too: bootstrap, or a random subsample."),
    click.option("--train-precision", type=click.Choice(TRAIN_PRECISIONS), default=_DEFAULT_TRAIN.precision,
                 show_default=True, help="bfloat16: forward and backward passes under autocast (fast where the CPU "
                                         "or GPU has bfloat16 matrix units); weights stay float32."),
)

scorer_options = _stack(
    click.option("--k", type=int, default=_DEFAULT_SCORER.k, show_default=True, help="Neighbours per row."),
    click.option("--sigma", type=float, default=_DEFAULT_SCORER.sigma, show_default=True, help="Neighbourhood radius."),
    click.option("--sigma-mode", type=click.Choice(SIGMA_MODES), default=_DEFAULT_SCORER.sigma_mode, show_default=True,
                 help="relative: sigma times the row's embedding norm; absolute: embedding units."),
    click.option("--alpha", type=float, default=_DEFAULT_SCORER.alpha, show_default=True,
                 help="Certificates hold with probability 1 - alpha."),
    click.option("--tau", type=float, default=_DEFAULT_SCORER.tau, show_default=True,
                 help="A row is certified when its lower bound exceeds tau."),
    click.option("--bound", type=click.Choice(BOUNDS), default=_DEFAULT_SCORER.bound, show_default=True),
    click.option("--variance-bound", type=float, default=_DEFAULT_SCORER.variance_bound, show_default=True,
                 help="Stated bound on Var(Z) for --bound bernstein."),
    click.option("--noise", type=click.Choice(NOISES), default=_DEFAULT_SCORER.noise, show_default=True,
                 help="Neighbours on the sphere of radius sigma, or Gaussian with that expected radius."),
    click.option("--perturb", type=click.Choice(PERTURB_SITES), default=_DEFAULT_SCORER.perturb, show_default=True,
                 help="Where the noise goes: every input token embedding (the paper's), only the row's value tokens, "
                      "the hidden state entering the first fine-tuned layer, or the pooled vector the head reads "
                      "(travels with the registered model)."),
    click.option("--early-stop/--no-early-stop", default=_DEFAULT_SCORER.early_stop, show_default=True,
                 help="Stop a row's sampling once decided (needs --bound betting)."),
    click.option("--score-seed", type=int, default=_DEFAULT_SCORER.seed, show_default=True),
    click.option("--scorer-precision", type=click.Choice(PRECISIONS), default=_DEFAULT_SCORER.precision, show_default=True,
                 help="bfloat16: neighbour passes under autocast, several times faster where the CPU or GPU has "
                      "bfloat16 matrix units; probabilities move by about 1e-2 (travels with the registered model)."),
)

calibration_option = click.option(
    "--calibration", default=None, callback=blank_is_none,
    help="JSON file written by `tabcons calibrate --out`, or its MLflow run id: sets --sigma, --sigma-mode and --k.",
)

register_option = click.option(
    "--register", default=DEFAULT_REGISTER, show_default=True, callback=blank_is_none,
    help="Registered model name for the reference member ({dataset}: the dataset's name); 'none' registers nothing.",
)

serve_backend_option = click.option(
    "--serve-backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
    help="Engine of the registered model's neighbour passes: PyTorch, or an exported ONNX graph run by ONNX Runtime.",
)

experiment_option = click.option(
    "--experiment", default=None, callback=blank_is_none,
    help="MLflow experiment name (under `mlflow run` the run's own experiment is used).",
)

# What every command that fine-tunes an ensemble takes (train adds its registration options).
ensemble_options = _stack(data_options, training_options, scorer_options, experiment_option)


def train_settings_from_options(options: dict[str, Any]) -> TrainSettings:
    modules = tuple(m.strip() for m in (options["lora_modules"] or "").split(",") if m.strip())
    lora = LoraSettings(
        rank=options["lora_rank"],
        alpha=options["lora_alpha"],
        dropout=options["lora_dropout"],
        target_modules=modules,
        layers=options["lora_layers"] or None,
    )
    return TrainSettings(
        epochs=options["epochs"],
        schedule_epochs=options["schedule_epochs"],
        batch_size=options["batch_size"],
        learning_rate=options["learning_rate"],
        head_learning_rate=options["head_learning_rate"],
        class_weight=options["class_weight"],
        class_prior=options["class_prior"],
        tune_class_prior=options["tune_class_prior"],
        resample=options["resample"],
        precision=options["train_precision"],
        head=options["head"],
        attention_dropout=None if options["attention_dropout"] < 0 else options["attention_dropout"],
        lora=lora,
    )


def scorer_settings_from_options(options: dict[str, Any]) -> ScorerSettings:
    settings = ScorerSettings(
        k=options["k"],
        sigma=options["sigma"],
        sigma_mode=options["sigma_mode"],
        alpha=options["alpha"],
        tau=options["tau"],
        bound=options["bound"],
        variance_bound=options["variance_bound"],
        noise=options["noise"],
        perturb=options["perturb"],
        early_stop=options["early_stop"],
        seed=options["score_seed"],
        precision=options["scorer_precision"],
    )
    if options.get("calibration"):
        from mlflow_tabcons.tracking.calibration import apply_calibration, load_calibration

        settings = apply_calibration(settings, load_calibration(options["calibration"]))
    return settings


def training_config_from_options(options: dict[str, Any]) -> TrainingConfig:
    return TrainingConfig(
        data=options["data"],
        target=options["target"],
        question=options["question"],
        dictionary=options["dictionary"],
        template=options["template"],
        numbers=options["numbers"],
        recipe=options["recipe"],
        recipe_budget=options["recipe_budget"],
        shots=options["shots"],
        seeds=options["seeds"],
        max_replacements=options["max_replacements"],
        eval_rows=options["eval_rows"],
        model=options["model"],
        experiment=options["experiment"],
        register=options.get("register"),
        serve_backend=options.get("serve_backend") or "torch",
        split_seed=options["split_seed"],
        train=train_settings_from_options(options),
        scorer=scorer_settings_from_options(options),
    )


def user_errors(function: Callable) -> Callable:
    """Show bad input as a one-line usage error, not a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except MlflowException as error:
            if error.get_http_status_code() >= 500:
                raise
            raise click.UsageError(error.message) from None

    return wrapper
