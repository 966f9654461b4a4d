"""Read a policy YAML file strictly: every mistake is an error naming the file and line, never a silent allow-all.

The file is parsed into YAML nodes (which carry their line numbers) and
walked by hand, so duplicate keys, unknown keys, wrong types and thresholds
out of [0, 1] are all reported where they are.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate.rules import (
    CERTIFIED_ON,
    RULE_KEYS,
    STAGES,
    CertifiedFractionRule,
    ModelOverride,
    Policy,
)

POLICY_ENV = "TABCONS_POLICY"
TOP_KEYS = ("version", "allow_break_glass", "aliases", "stages", "copy", "models")
MODEL_KEYS = ("aliases", "stages", "copy")
_FLOAT_TAGS = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")


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

    def number(self, node: yaml.Node, what: str) -> float:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in _FLOAT_TAGS:
            raise self.fail(node, f"{what} must be a number, got {getattr(node, 'value', node)!r}")
        value = float(yaml.safe_load(node.value))
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise self.fail(node, f"{what} must be a fraction in [0, 1], got {node.value}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            raise self.fail(node, f"{what} must be true or false, got {getattr(node, 'value', node)!r}")
        return bool(yaml.safe_load(node.value))

    def rule_set(self, node: yaml.Node, what: str, *, overriding: bool) -> dict[str, Any]:
        rules: dict[str, Any] = {}
        for key, (key_node, value_node) in self.mapping(node, what, RULE_KEYS).items():
            if overriding and value_node.tag == "tag:yaml.org,2002:null":
                rules[key] = None
            elif key == "min_certified_fraction":
                rules[key] = self.certified_rule(value_node, f"{what}.{key}")
            else:
                rules[key] = self.number(value_node, f"{what}.{key}")
        if not rules:
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
            for alias, (_k, value) in self.mapping(entries["aliases"][1], f"{what}aliases").items():
                found[f"alias:{alias}"] = self.rule_set(value, f"{what}aliases.{alias}", overriding=overriding)
        if "stages" in entries:
            for stage, (key_node, value) in self.mapping(entries["stages"][1], f"{what}stages").items():
                canonical = next((s for s in STAGES if s.lower() == stage.lower()), None)
                if canonical is None:
                    raise self.fail(key_node, f"unknown stage {stage!r}; MLflow's stages are {list(STAGES)}")
                found[f"stage:{canonical}"] = self.rule_set(value, f"{what}stages.{stage}", overriding=overriding)
        if "copy" in entries:
            found["copy"] = self.rule_set(entries["copy"][1], f"{what}copy", overriding=overriding)
        return found


def parse_policy(text: str, source: str = "<string>") -> Policy:
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"policy {source}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if root is None:
        raise PolicyError(f"policy {source}: the file is empty")
    top = reader.mapping(root, "the policy", TOP_KEYS)
    if "version" not in top or top["version"][1].value != "1":
        raise reader.fail(top.get("version", (root, root))[1], "the policy must start with `version: 1`")
    defaults = reader.targets(top, "", overriding=False)
    models = []
    if "models" in top:
        for pattern, (_k, value) in reader.mapping(top["models"][1], "models").items():
            entries = reader.mapping(value, f"models.{pattern}", MODEL_KEYS)
            models.append(ModelOverride(pattern, reader.targets(entries, f"models.{pattern}.", overriding=True)))
    if not defaults and not any(m.rules for m in models):
        raise reader.fail(root, "the policy protects nothing; name at least one alias, stage or copy rule")
    allow = reader.boolean(top["allow_break_glass"][1], "allow_break_glass") if "allow_break_glass" in top else True
    return Policy(source=source, defaults=defaults, models=tuple(models), allow_break_glass=allow)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(f"policy {path}: cannot read it: {error.strerror}") from None
    return parse_policy(text, str(path))


def policy_path_from_env() -> Path:
    value = os.environ.get(POLICY_ENV)
    if not value:
        raise PolicyError(
            f"the tabcons registry store needs a policy file: set {POLICY_ENV}=/path/to/policy.yaml "
            "(or start the server with `tabcons server --policy ...`)"
        )
    return Path(value).expanduser()
