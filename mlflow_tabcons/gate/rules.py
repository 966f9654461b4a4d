"""What a policy says: rule sets per protected target (alias, legacy stage, copy), with per-model overrides.

A rule set is resolved for one (model, target) pair by layering the policy's
defaults and then every matching ``models:`` entry in file order, key by key;
an override of ``null`` drops that rule for the model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

CERTIFIED_ON = ("point", "lower")
RULE_KEYS = ("min_certified_fraction", "max_arbitrariness", "min_accuracy", "max_churn")
STAGES = ("None", "Staging", "Production", "Archived")
TARGET_KINDS = ("alias", "stage", "copy")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a model version is being promoted: an alias, a legacy stage, or (copy) into another registered model."""

    kind: str
    name: str = ""

    @property
    def key(self) -> str:
        return self.kind if self.kind == "copy" else f"{self.kind}:{self.name}"

    def describe(self) -> str:
        return {"alias": f"alias @{self.name}", "stage": f"stage {self.name}", "copy": f"copy from {self.name}"}[self.kind]

    @property
    def verdict_tag(self) -> str:
        """The model-version tag showing the current verdict, visible in the MLflow UI."""
        return "tabcons.verdict." + (self.name if self.kind == "alias" else f"{self.kind}.{self.name}")


@dataclasses.dataclass(frozen=True)
class CertifiedFractionRule:
    """Minimum certified-consistent fraction, on the point estimate or on its interval's lower end."""

    threshold: float
    on: str


@dataclasses.dataclass(frozen=True)
class RuleSet:
    min_certified_fraction: CertifiedFractionRule | None = None
    max_arbitrariness: float | None = None
    min_accuracy: float | None = None
    max_churn: float | None = None

    @classmethod
    def from_layers(cls, layers: list[Mapping[str, Any]]) -> RuleSet:
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update(layer)
        return cls(**{k: v for k, v in merged.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class ModelOverride:
    pattern: str
    rules: Mapping[str, Mapping[str, Any]]  # target key -> {rule key: value or None}

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A validated policy file."""

    source: str
    defaults: Mapping[str, Mapping[str, Any]]
    models: tuple[ModelOverride, ...] = ()
    allow_break_glass: bool = True

    def rules_for(self, model: str, target: Target) -> RuleSet | None:
        """The merged rules, or None when nothing protects the target for this model (an override may null them all)."""
        layers = [self.defaults[target.key]] if target.key in self.defaults else []
        layers += [m.rules[target.key] for m in self.models if m.matches(model) and target.key in m.rules]
        rules = RuleSet.from_layers(layers)
        return None if rules == RuleSet() else rules
