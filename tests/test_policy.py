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
    assert policy.break_glass.allowed is False  # off unless the policy turns it on


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
        ("version: 1\nbreak_glass: {allowed: maybe}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "true or false"),
        ("version: 1\nallow_break_glass: true\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "replaced by `break_glass:"),
        ("version: 1\nprotocol: {min_tau: 2}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "protocol.min_tau must be in [-1.0, 1.0]"),
        ("version: 1\nprotocol: {bounds: [hoeffding]}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "must be one of"),
        ("version: 1\nprotocol: {max_replaced_fraction: 1.5}\naliases:\n  c: {min_accuracy: 0.5}\n", 2,
         "protocol.max_replaced_fraction must be a fraction in [0, 1]"),
        ("version: 1\nprotocol: {min_k: 0}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "whole number >= 1"),
        ("version: 1\nprotocol: {min_k: !!int many}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "whole number >= 1"),
        ("version: 1\nprotocol: {min_sigma: !!float wide}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "must be a number"),
        ("version: 1\nprotocol: {allow_early_stop: !!bool maybe}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "true or false"),
        ("version: 1\nprotocol: {evidence: signed}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "one of ['trainer', 'verified']"),
        ("version: 1\nprotocol: {holdout_sha256: abc}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "sha256 hex digest"),
        ("version: 1\nprotocol: {max_alpha: 0}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "strictly between 0 and 1"),
        ("version: 1\nprotocol: {mn_k: 3}\naliases:\n  c: {min_accuracy: 0.5}\n", 2, "unknown key 'mn_k'"),
        ("version: 1\naliases:\n  c: {protocol: {min_k: 8}}\n", 3, "has no rules"),
        ("version: 1\naliases:\n  c: {min_accuracy: 0.5}\n  C: {min_accuracy: 0.6}\n", 4, "named twice"),
        ("version: 1\nstages:\n  Production: {min_accuracy: 0.9}\n  production: {min_accuracy: 0.1}\n", 4, "named twice"),
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


def test_counts_read_every_yaml_integer_spelling():
    for text, expected in (("0x10", 16), ("0b11", 3), ("1_000", 1000), ("1:30", 90)):
        policy = parse_policy(f"version: 1\nprotocol: {{min_k: {text}}}\naliases:\n  c: {{min_accuracy: 0.5}}\n")
        assert policy.protocol == {"min_k": expected}


def test_empty_policy_is_an_error_not_allow_all():
    with pytest.raises(PolicyError, match="empty"):
        parse_policy("", "policy.yaml")


def _rules() -> RuleSet:
    return parse_policy(POLICY).rules_for("credit", CHAMPION)


def test_every_rule_passes_with_its_value_and_threshold():
    verdict = decide("credit", "2", CHAMPION, _rules(), evidence("r", lower=0.85, accuracy=0.7, arbitrariness=0.1))
    assert verdict.allowed and verdict.failures == []
    assert [(c.rule, round(c.value, 4), c.threshold) for c in verdict.checks] == [  # 90 of 100 certified: [0.8238, 0.9510]
        ("min_certified_fraction", 0.8238, 0.8), ("max_arbitrariness", 0.1, 0.1), ("min_accuracy", 0.7, 0.7), ("max_churn", 0.0, 0.3),
    ]


def test_each_failed_rule_is_listed():
    verdict = decide("credit", "2", CHAMPION, _rules(), evidence("r", lower=0.8, accuracy=0.69, arbitrariness=0.11))
    assert not verdict.allowed
    assert verdict.failures == [  # 85 of 100 certified: the policy's 95% interval starts at 0.7647
        "min_certified_fraction (lower end of the policy's 95% interval): 0.7647 < 0.8000",
        "max_arbitrariness: 0.1100 > 0.1000",
        "min_accuracy: 0.6900 < 0.7000",
    ]
    assert verdict.summary().startswith("refused ")


@pytest.mark.parametrize(("on", "allowed"), [("point", True), ("lower", False)])
def test_certified_fraction_on_point_or_lower_end(on, allowed):
    rules = RuleSet(min_certified_fraction=CertifiedFractionRule(0.8, on))
    verdict = decide("m", "1", CHAMPION, rules, evidence("r", lower=0.76))  # point 0.81, lower end 0.72
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
    # break-glass does not override evidence that is missing or measured off-protocol, unless the policy says so
    for untrusted in (dict(evidence=None, problems=("tampered evidence",)), dict(evidence=evidence("r", tau=-0.9))):
        kept = decide("m", "1", CHAMPION, _rules(), break_glass="INC-1", **untrusted)
        assert not kept.allowed and "does not override" in kept.summary()
        assert decide("m", "1", CHAMPION, _rules(), break_glass="INC-1", break_glass_overrides_evidence=True, **untrusted).allowed


def test_the_cheat_of_the_issue_is_refused_naming_every_breach():
    """tau -0.9, alpha 0.5, k 16, 60 rows, members at the majority rate: every breach is named with value and limit."""
    cheat = evidence("r", lower=0.9, predictions="0" * 60, tau=-0.9, alpha=0.5, k=16, n_eval=60, members=2,
                     members_learned=False, certified_fraction=1.0, certified_fraction_upper=1.0)
    verdict = decide("cheat", "1", CHAMPION, RuleSet(min_certified_fraction=CertifiedFractionRule(0.9, "lower")), cheat)
    assert not verdict.allowed
    assert verdict.breaches == (
        "protocol breach: tau -0.9 (policy: at least 0.5; certified must mean the label survives)",
        "protocol breach: alpha 0.5 (policy: at most 0.05)",
        "protocol breach: k 16 (policy: at least 64)",
        "protocol breach: members_learned false (policy: the members must beat the majority rate on the rows they never saw)",
    )
    # the interval on: lower reads is the policy's 95% one, not the evidence's 50%: 60 of 60 -> 0.9404
    assert verdict.checks[0].describe() == "min_certified_fraction (lower end of the policy's 95% interval): 0.9404 >= 0.9000"


@pytest.mark.parametrize(
    ("change", "breach"),
    [
        (dict(bound="bernstein", variance_bound=0.01, max_row_variance=0.2), "protocol breach: bound 'bernstein'"),
        (dict(sigma=0.01), "protocol breach: sigma 0.01 (policy: at least 0.5)"),
        (dict(sigma_mode="absolute"), "protocol breach: sigma_mode 'absolute'"),
        (dict(members=1), "protocol breach: members 1 (policy: at least 2)"),
        (dict(members=3, members_replaced=2), "protocol breach: members_replaced 2 of 3 (policy: at most 0.5 of the members)"),
        (dict(members=3, members_replaced=1), None),
        (dict(members=3, members_replaced=3, role="verifier"), None),
        (dict(perturb="pooled"), "protocol breach: perturb 'pooled' (policy: one of ['embeddings', 'values', 'hidden'])"),
        (dict(role="verifier"), None),
    ],
)
def test_default_protocol_breaches(change, breach):
    found = decide("m", "1", CHAMPION, RuleSet(min_accuracy=0.5), evidence("r", **change)).breaches
    assert (breach is None and found == ()) or (breach is not None and found[0].startswith(breach))


def test_a_policy_can_refuse_any_replaced_member():
    """Replacing members that did not learn lowers the multiplicity measured: the policy, not the trainer, bounds it."""
    protocol = parse_policy(POLICY.replace("stages:", "protocol: {max_replaced_fraction: 0}\nstages:", 1)).protocol_for("m", CHAMPION)
    rules = RuleSet(min_accuracy=0.5)
    assert decide("m", "1", CHAMPION, rules, evidence("r", members=5), protocol=protocol).breaches == ()
    assert decide("m", "1", CHAMPION, rules, evidence("r", members=5, members_replaced=1), protocol=protocol).breaches == (
        "protocol breach: members_replaced 1 of 5 (policy: at most 0 of the members)",
    )


def test_policy_protocol_layers_and_a_stated_variance_bound():
    text = POLICY.replace("stages:", "protocol: {bounds: [bernstein, empirical-bernstein], min_k: 32}\nstages:", 1)
    text += '  "credit*":\n    protocol: {min_k: 256}\n    aliases:\n      champion: {protocol: {evidence: verified}}\n'
    policy = parse_policy(text)
    assert policy.protocol_for("other", CHAMPION).min_k == 32
    credit = policy.protocol_for("Credit-Risk", Target("alias", "CHAMPION"))  # names compare case-insensitively
    assert (credit.min_k, credit.evidence, credit.bounds) == (256, "verified", ("bernstein", "empirical-bernstein"))
    rules = policy.rules_for("other", CHAMPION)
    protocol = policy.protocol_for("other", CHAMPION)
    under = evidence("r", bound="bernstein", variance_bound=0.05, max_row_variance=0.2)
    assert decide("m", "1", CHAMPION, rules, under, protocol=protocol).breaches == (
        "protocol breach: variance_bound 0.05 (policy: at least every row's sample variance, the largest of which is 0.2)",
    )
    covering = evidence("r", bound="bernstein", variance_bound=0.25, max_row_variance=0.2)
    assert decide("m", "1", CHAMPION, rules, covering, protocol=protocol).breaches == ()
