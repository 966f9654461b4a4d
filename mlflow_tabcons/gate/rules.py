"""What a policy says: rule sets and measurement protocols per protected target, with per-model overrides.

A rule set is resolved for one (model, target) pair by layering the policy's
defaults and then every matching ``models:`` entry in file order, key by key;
an override of ``null`` drops that rule for the model. The protocol is layered
the same way, from the safe default up: the global ``protocol:``, each matching
model pattern's, the target's, each matching model pattern's target's.

Names compare case-insensitively (aliases, model patterns): MySQL and MariaDB
compare them so by default, and ``CHAMPION`` must not land ungated on the row
``champion`` protects.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

from mlflow_tabcons.gate.evidence import BREAK_GLASS_TAG
from mlflow_tabcons.gate.protocol import Protocol

CERTIFIED_ON = ("point", "lower")
RULE_KEYS = ("min_certified_fraction", "max_arbitrariness", "min_accuracy", "max_churn")
PROTOCOL_KEY = "protocol"
STAGES = ("None", "Staging", "Production", "Archived")
TARGET_KINDS = ("alias", "stage", "copy")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a model version is being promoted: an alias, a legacy stage, or (copy) into another registered model."""

    kind: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind == "alias":  # aliases compare case-insensitively, as MySQL/MariaDB store them
            object.__setattr__(self, "name", self.name.lower())

    @property
    def key(self) -> str:
        return self.kind if self.kind == "copy" else f"{self.kind}:{self.name}"

    def describe(self) -> str:
        return {"alias": f"alias @{self.name}", "stage": f"stage {self.name}", "copy": f"copy from {self.name}"}[self.kind]

    @property
    def suffix(self) -> str:
        return self.name if self.kind == "alias" else "copy" if self.kind == "copy" else f"stage.{self.name}"

    @property
    def verdict_tag(self) -> str:
        """The model-version tag showing the current verdict, visible in the MLflow UI."""
        return f"tabcons.verdict.{self.suffix}"

    @property
    def break_glass_tag(self) -> str:
        """The model-version tag that arms a break-glass override for this target alone."""
        return f"{BREAK_GLASS_TAG}.{self.suffix}"

    @classmethod
    def from_break_glass_tag(cls, key: str) -> Target | None:
        """The target a ``tabcons.break_glass.<alias>`` / ``.stage.<Stage>`` / ``.copy`` key names, or None."""
        suffix = key[len(BREAK_GLASS_TAG) + 1:] if key.lower().startswith(BREAK_GLASS_TAG + ".") else ""
        if not suffix:
            return None
        if suffix == "copy":
            return cls("copy")
        if suffix.lower().startswith("stage."):
            stage = next((s for s in STAGES if s.lower() == suffix[6:].lower()), None)
            return None if stage is None else cls("stage", stage)
        return cls("alias", suffix)


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
            merged.update({k: v for k, v in layer.items() if k != PROTOCOL_KEY})
        return cls(**{k: v for k, v in merged.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class BreakGlass:
    """Who may override a refusal, for how long, and whether untrusted evidence can be overridden at all.

    Off unless the policy turns it on. The identity that arms it must be
    authenticated, must not be the one that promotes, and (when ``approvers``
    is not empty) must be one of them.
    """

    allowed: bool = False
    ttl_minutes: float = 60.0
    approvers: tuple[str, ...] = ()
    overrides_evidence: bool = False

    def may_arm(self, actor: str) -> bool:
        """``actor`` as the audit names it: an authenticated user, or ``local:<OS user>`` for an in-process client."""
        return not self.approvers or person(actor) in {person(a) for a in self.approvers}


def person(actor: str) -> str:
    """Who ``actor`` is, whichever way they came in: ``local:anna`` (the OS user, in process) and ``Anna`` (over
    REST) are one person, so one of them cannot arm break-glass for the other to promote."""
    return actor.removeprefix("local:").lower()


@dataclasses.dataclass(frozen=True)
class ModelOverride:
    pattern: str
    rules: Mapping[str, Mapping[str, Any]]  # target key -> {rule key: value or None, "protocol": {...}}
    protocol: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name.lower(), self.pattern.lower())


@dataclasses.dataclass(frozen=True)
class Policy:
    """A validated policy file."""

    source: str
    defaults: Mapping[str, Mapping[str, Any]]
    models: tuple[ModelOverride, ...] = ()
    protocol: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    break_glass: BreakGlass = BreakGlass()

    def _target_layers(self, model: str, target: Target) -> list[Mapping[str, Any]]:
        layers = [self.defaults[target.key]] if target.key in self.defaults else []
        return layers + [m.rules[target.key] for m in self.models if m.matches(model) and target.key in m.rules]

    def rules_for(self, model: str, target: Target) -> RuleSet | None:
        """The merged rules, or None when nothing protects the target for this model (an override may null them all)."""
        rules = RuleSet.from_layers(self._target_layers(model, target))
        return None if rules == RuleSet() else rules

    def protocol_for(self, model: str, target: Target) -> Protocol:
        """The protocol evidence must meet for this model and target, layered over the safe default."""
        layers = [self.protocol] + [m.protocol for m in self.models if m.matches(model)]
        layers += [layer.get(PROTOCOL_KEY) or {} for layer in self._target_layers(model, target)]
        return Protocol.from_layers(layers)

    def protects(self, model: str, target: Target) -> bool:
        return self.rules_for(model, target) is not None
