"""Read a policy YAML file strictly: every mistake is an error naming the file and line, never a silent allow-all.

The file is parsed into YAML nodes (which carry their line numbers) and
walked by hand, so duplicate keys, unknown keys, wrong types and thresholds
out of [0, 1] are all reported where they are.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate.protocol import (
    BOUND_NAMES,
    EVIDENCE_KINDS,
    NOISE_NAMES,
    PERTURB_NAMES,
    PRECISION_NAMES,
    PROTOCOL_KEYS,
    SIGMA_MODE_NAMES,
)
from mlflow_tabcons.gate.rules import (
    CERTIFIED_ON,
    PROTOCOL_KEY,
    RULE_KEYS,
    STAGES,
    BreakGlass,
    CertifiedFractionRule,
    ModelOverride,
    Policy,
)

POLICY_ENV = "TABCONS_POLICY"
TOP_KEYS = ("version", "break_glass", "protocol", "aliases", "stages", "copy", "models")
MODEL_KEYS = ("protocol", "aliases", "stages", "copy")
BREAK_GLASS_KEYS = ("allowed", "ttl_minutes", "approvers", "overrides_evidence")
# protocol key -> (kind, choices or numeric range)
_PROTOCOL_SCHEMA: dict[str, tuple[str, Any]] = {
    "min_tau": ("number", (-1.0, 1.0)),
    "max_alpha": ("number", (0.0, 1.0)),
    "interval_alpha": ("number", (0.0, 1.0)),
    "bounds": ("choices", BOUND_NAMES),
    "min_k": ("count", None),
    "min_eval_rows": ("count", None),
    "min_members": ("count", None),
    "max_replaced_fraction": ("number", (0.0, 1.0)),
    "sigma_modes": ("choices", SIGMA_MODE_NAMES),
    "min_sigma": ("number", (0.0, None)),
    "max_sigma": ("number", (0.0, None)),
    "noises": ("choices", NOISE_NAMES),
    "perturbs": ("choices", PERTURB_NAMES),
    "precisions": ("choices", PRECISION_NAMES),
    "allow_early_stop": ("boolean", None),
    "members_learned": ("boolean", None),
    "evidence": ("choice", EVIDENCE_KINDS),
    "holdout_sha256": ("sha256", None),
}
assert set(_PROTOCOL_SCHEMA) == set(PROTOCOL_KEYS)
_SHA256 = re.compile(r"^(sha256:)?[0-9a-f]{64}$")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAGS = ("tag:yaml.org,2002:float", _INT_TAG)


class PolicyError(TabconsInputError):
    """The policy file is unreadable or malformed."""


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, message: str) -> PolicyError:
        where = f"{self.source} line {node.start_mark.line + 1}" if node is not None else self.source
        return PolicyError(f"policy {where}: {message}")

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, f"keys of {what} must be plain names")
            key = key_node.value
            if key in entries:
                raise self.fail(key_node, f"duplicate key {key!r} in {what}")
            if allowed is not None and key not in allowed:
                raise self.fail(key_node, f"unknown key {key!r} in {what}; expected one of {list(allowed)}")
            entries[key] = (key_node, value_node)
        return entries

    def typed(self, node: yaml.Node, tags: tuple[str, ...], types: tuple[type, ...], what: str, expected: str) -> Any:
        """A scalar YAML tags as one of ``tags`` whose text reads as one of ``types`` (``!!int abc`` and ``0x1G`` do not)."""
        value = None
        if isinstance(node, yaml.ScalarNode) and node.tag in tags:
            try:
                value = yaml.safe_load(node.value)
            except yaml.YAMLError:
                value = None
        if not isinstance(value, types) or isinstance(value, bool) != (bool in types):
            raise self.fail(node, f"{what} must be {expected}, got {getattr(node, 'value', node)!r}")
        return value

    def number(self, node: yaml.Node, what: str, low: float | None = 0.0, high: float | None = 1.0) -> float:
        value = float(self.typed(node, _FLOAT_TAGS, (int, float), what, "a number"))
        if (low, high) == (0.0, 1.0) and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise self.fail(node, f"{what} must be a fraction in [0, 1], got {node.value}")
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(node, f"{what} must be in [{low}, {'inf' if high is None else high}], got {node.value}")
        return value

    def count(self, node: yaml.Node, what: str) -> int:
        value = self.typed(node, (_INT_TAG,), (int,), what, "a whole number >= 1")
        if value < 1:
            raise self.fail(node, f"{what} must be a whole number >= 1, got {node.value!r}")
        return value

    def text(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str" or not node.value.strip():
            raise self.fail(node, f"{what} must be a non-empty string, got {getattr(node, 'value', node)!r}")
        return node.value.strip()

    def choices(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else None
        if not items:
            raise self.fail(node, f"{what} must be a non-empty list drawn from {list(allowed)}")
        return tuple(self.choice(item, what, allowed) for item in items)

    def choice(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.value not in allowed:
            raise self.fail(node, f"{what} must be one of {list(allowed)}, got {getattr(node, 'value', node)!r}")
        return node.value

    def protocol(self, node: yaml.Node, what: str) -> dict[str, Any]:
        """A protocol layer: only the keys it names, each checked."""
        layer: dict[str, Any] = {}
        for key, (_k, value) in self.mapping(node, what, tuple(_PROTOCOL_SCHEMA)).items():
            kind, spec = _PROTOCOL_SCHEMA[key]
            where = f"{what}.{key}"
            if kind == "number":
                layer[key] = self.number(value, where, *spec)
            elif kind == "count":
                layer[key] = self.count(value, where)
            elif kind == "choices":
                layer[key] = self.choices(value, where, spec)
            elif kind == "choice":
                layer[key] = self.choice(value, where, spec)
            elif kind == "boolean":
                layer[key] = self.boolean(value, where)
            else:
                digest = self.text(value, where).lower()
                if not _SHA256.match(digest):
                    raise self.fail(value, f"{where} must be a sha256 hex digest (64 characters), got {value.value!r}")
                layer[key] = digest if digest.startswith("sha256:") else "sha256:" + digest
        for key in ("max_alpha", "interval_alpha"):
            if layer.get(key) in (0.0, 1.0):
                raise self.fail(node, f"{what}.{key} must be strictly between 0 and 1")
        return layer

    def break_glass(self, node: yaml.Node) -> BreakGlass:
        entries = self.mapping(node, "break_glass", BREAK_GLASS_KEYS)
        settings: dict[str, Any] = {}
        for key in ("allowed", "overrides_evidence"):
            if key in entries:
                settings[key] = self.boolean(entries[key][1], f"break_glass.{key}")
        if "ttl_minutes" in entries:
            settings["ttl_minutes"] = self.number(entries["ttl_minutes"][1], "break_glass.ttl_minutes", 0.0, None)
            if settings["ttl_minutes"] <= 0:
                raise self.fail(entries["ttl_minutes"][1], "break_glass.ttl_minutes must be above 0")
        if "approvers" in entries:
            value = entries["approvers"][1]
            if not isinstance(value, yaml.SequenceNode) or not value.value:
                raise self.fail(value, "break_glass.approvers must be a non-empty list of user names")
            settings["approvers"] = tuple(self.text(item, "break_glass.approvers") for item in value.value)
        return BreakGlass(**settings)

    def boolean(self, node: yaml.Node, what: str) -> bool:
        return self.typed(node, ("tag:yaml.org,2002:bool",), (bool,), what, "true or false")

    def rule_set(self, node: yaml.Node, what: str, *, overriding: bool) -> dict[str, Any]:
        rules: dict[str, Any] = {}
        for key, (key_node, value_node) in self.mapping(node, what, RULE_KEYS + (PROTOCOL_KEY,)).items():
            if key == PROTOCOL_KEY:
                rules[key] = self.protocol(value_node, f"{what}.{key}")
            elif overriding and value_node.tag == "tag:yaml.org,2002:null":
                rules[key] = None
            elif key == "min_certified_fraction":
                rules[key] = self.certified_rule(value_node, f"{what}.{key}")
            else:
                rules[key] = self.number(value_node, f"{what}.{key}")
        if not rules or (not overriding and not set(rules) - {PROTOCOL_KEY}):
            raise self.fail(node, f"{what} has no rules; remove it or name at least one of {list(RULE_KEYS)}")
        return rules

    def certified_rule(self, node: yaml.Node, what: str) -> CertifiedFractionRule:
        hint = f"write {what}: {{threshold: 0.8, on: lower}} (on: point or lower, said explicitly)"
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} needs a threshold and which estimate it applies to; {hint}")
        entries = self.mapping(node, what, ("threshold", "on"))
        for needed in ("threshold", "on"):
            if needed not in entries:
                raise self.fail(node, f"{what} is missing {needed!r}; {hint}")
        on_node = entries["on"][1]
        if not isinstance(on_node, yaml.ScalarNode) or on_node.value not in CERTIFIED_ON:
            raise self.fail(on_node, f"{what}.on must be one of {list(CERTIFIED_ON)}, got {getattr(on_node, 'value', on_node)!r}")
        return CertifiedFractionRule(self.number(entries["threshold"][1], f"{what}.threshold"), on_node.value)

    def targets(self, entries: dict[str, tuple[yaml.Node, yaml.Node]], what: str, *, overriding: bool) -> dict[str, dict[str, Any]]:
        """The aliases/stages/copy sections of one level (top or one model) as target key -> rules."""
        found: dict[str, dict[str, Any]] = {}
        if "aliases" in entries:
            for alias, (key_node, value) in self.mapping(entries["aliases"][1], f"{what}aliases").items():
                if f"alias:{alias.lower()}" in found:
                    raise self.fail(key_node, f"alias {alias!r} is named twice (aliases compare case-insensitively)")
                found[f"alias:{alias.lower()}"] = self.rule_set(value, f"{what}aliases.{alias}", overriding=overriding)
        if "stages" in entries:
            for stage, (key_node, value) in self.mapping(entries["stages"][1], f"{what}stages").items():
                canonical = next((s for s in STAGES if s.lower() == stage.lower()), None)
                if canonical is None:
                    raise self.fail(key_node, f"unknown stage {stage!r}; MLflow's stages are {list(STAGES)}")
                if f"stage:{canonical}" in found:
                    raise self.fail(key_node, f"stage {canonical!r} is named twice (stages compare case-insensitively)")
                found[f"stage:{canonical}"] = self.rule_set(value, f"{what}stages.{stage}", overriding=overriding)
        if "copy" in entries:
            found["copy"] = self.rule_set(entries["copy"][1], f"{what}copy", overriding=overriding)
        return found


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """The policy in ``text``; any mistake raises ``PolicyError`` naming ``source`` and the line."""
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"policy {source}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if root is None:
        raise PolicyError(f"policy {source}: the file is empty")
    if isinstance(root, yaml.MappingNode):
        for key_node, _value in root.value:
            if getattr(key_node, "value", None) == "allow_break_glass":
                raise reader.fail(key_node, "allow_break_glass is replaced by `break_glass: {allowed: true, ttl_minutes: 60, "
                                            "approvers: [...]}` (break-glass is off by default)")
    top = reader.mapping(root, "the policy", TOP_KEYS)
    if "version" not in top or top["version"][1].value != "1":
        raise reader.fail(top.get("version", (root, root))[1], "the policy must start with `version: 1`")
    defaults = reader.targets(top, "", overriding=False)
    models = []
    if "models" in top:
        for pattern, (_k, value) in reader.mapping(top["models"][1], "models").items():
            entries = reader.mapping(value, f"models.{pattern}", MODEL_KEYS)
            protocol = reader.protocol(entries[PROTOCOL_KEY][1], f"models.{pattern}.protocol") if PROTOCOL_KEY in entries else {}
            models.append(ModelOverride(pattern, reader.targets(entries, f"models.{pattern}.", overriding=True), protocol))
    if not defaults and not any(m.rules for m in models):
        raise reader.fail(root, "the policy protects nothing; name at least one alias, stage or copy rule")
    protocol = reader.protocol(top[PROTOCOL_KEY][1], "protocol") if PROTOCOL_KEY in top else {}
    glass = reader.break_glass(top["break_glass"][1]) if "break_glass" in top else BreakGlass()
    return Policy(source=source, defaults=defaults, models=tuple(models), protocol=protocol, break_glass=glass)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """The policy file at ``path``, parsed strictly (see ``parse_policy``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(f"policy {path}: cannot read it: {error.strerror}") from None
    return parse_policy(text, str(path))


def policy_path_from_env() -> Path:
    """The policy path ``TABCONS_POLICY`` names: a gated store without a policy is a startup error, never allow-all."""
    value = os.environ.get(POLICY_ENV)
    if not value:
        raise PolicyError(
            f"the tabcons registry store needs a policy file: set {POLICY_ENV}=/path/to/policy.yaml "
            "(or start the server with `tabcons server --policy ...`)"
        )
    return Path(value).expanduser()


class PolicyFile:
    """The policy at a path, re-parsed when its modification time or size changes (so every server worker agrees)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._policy: Policy | None = None

    def current(self) -> Policy:
        try:
            stat = self.path.stat()
        except OSError as error:
            raise PolicyError(f"policy {self.path}: cannot read it: {error.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp or self._policy is None:
            self._policy, self._stamp = load_policy(self.path), stamp
        return self._policy
