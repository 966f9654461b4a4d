"""What a `main` job is asked to do: the whole configuration of `tabcons train` / `mlflow run . -e main`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow_tabcons.data.serialize import NUMBER_STYLES, TEMPLATES
from mlflow_tabcons.errors import TabconsInputError, check_choice, check_int
from mlflow_tabcons.flavor.packaged import BACKENDS, check_backend_precision
from mlflow_tabcons.members.admission import MAX_REPLACEMENTS, default_replacements
from mlflow_tabcons.members.checkpoints import DEFAULT_MODEL
from mlflow_tabcons.members.recipe import RECIPE_MODES, SearchSettings
from mlflow_tabcons.members.training import TrainSettings
from mlflow_tabcons.scoring.consistency import INPUT_SITES, ScorerSettings

DEFAULT_REGISTER = "tabcons-{dataset}"


def registered_model_name(template: str, dataset: str) -> str:
    """``--register`` with ``{dataset}`` filled in by the dataset's name, as a registry-safe name."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-").lower() or "table"
    name = template.replace("{dataset}", slug).strip()
    if not name or "/" in name or ":" in name:
        raise TabconsInputError(f"--register must be a model name without '/' or ':', got {template!r}")
    return name


@dataclass(frozen=True)
class TrainingConfig:
    """Everything `tabcons train` / `mlflow run . -e main` takes."""

    data: str = "credit-g"
    target: str | None = None
    question: str | None = None
    dictionary: str | None = None
    template: str = "compact"
    # how numbers read: plain, words (with quantile words), or auto (the recipe search or the table decides)
    numbers: str = "auto"
    shots: int = 256
    seeds: int = 5
    # most members that did not learn (validation ranking no better than chance) may be replaced by new seeds;
    # None: half the ensemble, at least one (members/admission.py); 0: keep every member as trained
    max_replacements: int | None = None
    eval_rows: int = 100
    model: str = DEFAULT_MODEL
    experiment: str | None = None
    split_seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)
    # auto: choose the members' recipe on the validation rows (train.epochs is then the most a trial trains); fixed: train as is
    recipe: str = "auto"
    recipe_budget: int = SearchSettings.budget
    scorer: ScorerSettings = field(default_factory=ScorerSettings)
    # registered model name ({dataset} is filled in); None: log and register nothing
    register: str | None = DEFAULT_REGISTER
    serve_backend: str = "torch"  # engine of the registered model's neighbour passes: torch or onnx

    def __post_init__(self) -> None:
        check_int("seeds", self.seeds, minimum=2, maximum=1000)
        if self.max_replacements is not None:
            check_int("max_replacements", self.max_replacements, minimum=0, maximum=MAX_REPLACEMENTS)
        check_int("shots", self.shots, minimum=1)
        check_int("eval_rows", self.eval_rows, minimum=0)
        check_int("split_seed", self.split_seed, minimum=0)
        check_choice("template", self.template, TEMPLATES)
        check_choice("numbers", self.numbers, ("auto", *NUMBER_STYLES))
        check_choice("recipe", self.recipe, RECIPE_MODES)
        SearchSettings(budget=self.recipe_budget)
        if self.register is not None:
            registered_model_name(self.register, self.data)  # refuse a bad name before training, not after
        check_choice("serve_backend", self.serve_backend, BACKENDS)
        check_backend_precision(self.serve_backend, self.scorer.precision)
        if self.serve_backend == "onnx" and self.scorer.perturb not in INPUT_SITES:
            raise TabconsInputError(f"the ONNX backend perturbs only at {list(INPUT_SITES)}, not perturb={self.scorer.perturb!r}")

    @property
    def replacements(self) -> int:
        """How many members that did not learn may be replaced."""
        return default_replacements(self.seeds) if self.max_replacements is None else self.max_replacements

    def params(self) -> dict[str, Any]:
        """Flat parameters for MLflow (nested settings become dotted keys)."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, inner)
            else:
                flat[prefix] = ",".join(value) if isinstance(value, (list, tuple)) else value

        walk("", asdict(self))
        return flat
