"""Policy YAML (strict, line-numbered errors), rule layering, and verdicts as pure functions."""

from __future__ import annotations

import pytest
from gate_support import POLICY, evidence

from mlflow_tabcons.gate import CertifiedFractionRule, Incumbent, PolicyError, RuleSet, Target, decide, parse_policy

CHAMPION = Target("alias", "champion")


def test_defaults_overrides_and_stages_resolve_per_model():
    policy = parse_policy(POLICY + '  "credit-*":\n    aliases:\n      champion: {min_accuracy: 0.9}\n')
    assert policy.rules_for("credit-risk", CHAMPION) == RuleSet(
        min_certified_fraction=CertifiedFractionRule(0.8, "lower"), max_arbitrariness=0.10, min_accuracy=0.9, max_churn=0.30,
    )
    assert policy.rules_for("other", CHAMPION).min_accuracy == 0.70
    assert policy.rules_for("sandbox-x", CHAMPION) is None  # every rule nulled: not protected
    assert policy.rules_for("other", Target("alias", "dev")) is None
    assert policy.rules_for("other", Target("stage", "Production")).min_certified_fraction.on == "point"
    assert policy.rules_for("other", Target("copy", "dev-credit")).min_certified_fraction.threshold == 0.8
    assert policy.allow_break_glass is True


def test_stage_names_are_canonical():
    policy = parse_policy("version: 1\nstages:\n  production: {min_accuracy: 0.5}\n")
    assert policy.rules_for("m", Target("stage", "Production")) == RuleSet(min_accuracy=0.5)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("version: 1\naliases:\n  champion:\n    min_certified_fraction: 0.8\n", 4, "on: point or lower, said explicitly"),
        ("version: 1\naliases:\n  champion:\n    min_certified_fraction: {threshold: 0.8, on: upper}\n", 4, "on must be one of"),
        ("version: 1\naliases:\n  champion:\n    min_certified_fraction: {on: lower}\n", 4, "missing 'threshold'"),
        ("version: 1\naliases:\n  champion:\n    max_churn: 1.5\n", 4, "must be a fraction in [0, 1], got 1.5"),
        ("version: 1\naliases:\n  champion:\n    max_churn: lots\n", 4, "must be a number"),
        ("version: 1\naliases:\n  champion:\n    max_chrun: 0.1\n", 4, "unknown key 'max_chrun'"),
        ("version: 1\naliases:\n  a: {max_churn: 0.1}\n  a: {max_churn: 0.2}\n", 4, "duplicate key 'a'"),
        ("version: 1\naliases:\n  champion: {}\n", 3, "has no rules"),
        ("version: 1\nstages:\n  Prod: {min_accuracy: 0.5}\n", 3, "unknown stage 'Prod'"),
        ("version: 1\nallow_break_glass: maybe\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "true or false"),
        ("version: 2\naliases:\n  c: {min_accuracy: 0.5}\n", 1, "version: 1"),
        ("version: 1\naliases:\n  c: [\n", 4, "not valid YAML"),
        ("version: 1\nmodels:\n  m:\n    alias: {}\n", 4, "unknown key 'alias' in models.m"),
        ("version: 1\n", 1, "protects nothing"),
    ],
)
def test_malformed_policy_names_the_line(text, line, fragment):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    assert f"policy.yaml line {line}:" in caught.value.message
    assert fragment in caught.value.message
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_empty_policy_is_an_error_not_allow_all():
    with pytest.raises(PolicyError, match="empty"):
        parse_policy("", "policy.yaml")


def _rules() -> RuleSet:
    return parse_policy(POLICY).rules_for("credit", CHAMPION)


def test_every_rule_passes_with_its_value_and_threshold():
    verdict = decide("credit", "2", CHAMPION, _rules(), evidence("r", lower=0.8, accuracy=0.7, arbitrariness=0.1))
    assert verdict.allowed and verdict.failures == []
    assert [(c.rule, c.value, c.threshold) for c in verdict.checks] == [
        ("min_certified_fraction", 0.8, 0.8), ("max_arbitrariness", 0.1, 0.1), ("min_accuracy", 0.7, 0.7), ("max_churn", 0.0, 0.3),
    ]


def test_each_failed_rule_is_listed():
    verdict = decide("credit", "2", CHAMPION, _rules(), evidence("r", lower=0.79, accuracy=0.69, arbitrariness=0.11))
    assert not verdict.allowed
    assert verdict.failures == [
        "min_certified_fraction (lower end of its 95% interval): 0.7900 < 0.8000",
        "max_arbitrariness: 0.1100 > 0.1000",
        "min_accuracy: 0.6900 < 0.7000",
    ]
    assert verdict.summary().startswith("refused ")


@pytest.mark.parametrize(("on", "allowed"), [("point", True), ("lower", False)])
def test_certified_fraction_on_point_or_lower_end(on, allowed):
    rules = RuleSet(min_certified_fraction=CertifiedFractionRule(0.8, on))
    verdict = decide("m", "1", CHAMPION, rules, evidence("r", lower=0.76))  # point 0.81, lower 0.76
    assert verdict.allowed is allowed


def test_churn_against_the_incumbent():
    rules = RuleSet(max_churn=0.3)
    new = evidence("r", predictions="1100")
    assert decide("m", "2", CHAMPION, rules, new, incumbent=Incumbent("1", evidence("q", predictions="1000"))).allowed
    far = decide("m", "2", CHAMPION, rules, new, incumbent=Incumbent("1", evidence("q", predictions="0011")))
    assert far.failures == ["max_churn (against version 1): 1.0000 > 0.3000"]
    assert decide("m", "2", CHAMPION, rules, new, incumbent=Incumbent("2", None)).allowed  # re-pointing at itself
    other_set = decide("m", "2", CHAMPION, rules, new, incumbent=Incumbent("1", evidence("q", digest="sha256:other")))
    assert "another evaluation set" in other_set.failures[0]
    untrusted = decide("m", "2", CHAMPION, rules, new, incumbent=Incumbent("1", None, "tampered evidence: x"))
    assert "cannot compare with version 1: tampered evidence" in untrusted.failures[0]


def test_problems_refuse_and_break_glass_allows_flagged():
    refused = decide("m", "1", CHAMPION, _rules(), None, problems=("no tabcons.evidence tag",))
    assert not refused.allowed and refused.failures == ["no tabcons.evidence tag"]
    glass = decide("m", "1", CHAMPION, _rules(), evidence("r", lower=0.5), break_glass="INC-1")
    assert glass.allowed and glass.summary().startswith("allowed by break-glass") and "INC-1" in glass.summary()
    assert glass.to_dict()["break_glass"] == "INC-1" and glass.to_dict()["checks"][0]["passed"] is False
