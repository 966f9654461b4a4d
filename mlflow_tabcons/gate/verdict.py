"""Verdicts as pure functions: rules + protocol + trusted evidence (+ the incumbent's) -> allowed or refused, with reasons.

Nothing here touches a database, so every rule's arithmetic is tested alone.
A verdict lists each rule with its value and threshold and each protocol
breach with its value and the policy's limit; evidence that cannot be trusted,
or a policy that cannot be read, refuses with the reason.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from mlflow_tabcons.gate.evidence import Evidence
from mlflow_tabcons.gate.protocol import DEFAULT_PROTOCOL, Protocol, breaches
from mlflow_tabcons.gate.rules import RuleSet, Target
from mlflow_tabcons.metrics.multiplicity import churn


@dataclasses.dataclass(frozen=True)
class Check:
    rule: str
    value: float | None
    threshold: float
    passed: bool
    detail: str = ""

    def describe(self) -> str:
        if self.value is None:
            return f"{self.rule}: {self.detail}"
        sign = (">=" if self.passed else "<") if self.rule.startswith("min_") else ("<=" if self.passed else ">")
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.rule}{extra}: {self.value:.4f} {sign} {self.threshold:.4f}"


@dataclasses.dataclass(frozen=True)
class Incumbent:
    """The version holding the target, for max_churn; ``problem`` says why its evidence is not usable.

    ``live``: it holds the target now; otherwise it is the last allowed holder
    from the audit trail (since removed, archived or deleted) and always compared.
    """

    version: str
    evidence: Evidence | None
    problem: str | None = None
    live: bool = True


@dataclasses.dataclass(frozen=True)
class Verdict:
    model: str
    version: str
    target: Target
    allowed: bool
    checks: tuple[Check, ...] = ()
    problems: tuple[str, ...] = ()
    break_glass: str | None = None
    decided_at: float = dataclasses.field(default_factory=time.time)
    breaches: tuple[str, ...] = ()
    evidence: Evidence | None = None

    @property
    def failures(self) -> list[str]:
        return list(self.problems) + list(self.breaches) + [c.describe() for c in self.checks if not c.passed]

    def summary(self) -> str:
        state = "allowed" if self.allowed else "refused"
        if self.break_glass is not None and self.failures:
            state = "allowed by break-glass"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.decided_at))
        parts = self.failures or [c.describe() for c in self.checks] or ["no rules to check"]
        glass = f"; break-glass justification: {self.break_glass}" if self.break_glass is not None else ""
        return f"{state} {when}, {self.target.describe()}: " + "; ".join(parts) + glass

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "target": self.target.key,
            "allowed": self.allowed,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "problems": list(self.problems),
            "breaches": list(self.breaches),
            "break_glass": self.break_glass,
            "decided_at": self.decided_at,
            "evidence": None if self.evidence is None else self.evidence.to_dict(),
        }


def _minimum(rule: str, value: float, threshold: float, detail: str = "") -> Check:
    return Check(rule, value, threshold, value >= threshold, detail)


def _maximum(rule: str, value: float, threshold: float, detail: str = "") -> Check:
    return Check(rule, value, threshold, value <= threshold, detail)


def churn_check(threshold: float, evidence: Evidence, version: str, incumbent: Incumbent | None) -> Check:
    if incumbent is None or (incumbent.live and incumbent.version == version):
        return Check("max_churn", 0.0, threshold, True, "no other version holds it now")
    if incumbent.evidence is None:
        reason = incumbent.problem or "it has no evidence"
        return Check("max_churn", None, threshold, False, f"cannot compare with version {incumbent.version}: {reason}")
    if incumbent.evidence.eval_digest != evidence.eval_digest:
        return Check(
            "max_churn", None, threshold, False,
            f"version {incumbent.version} was evaluated on another evaluation set, so churn cannot be measured",
        )
    value = churn(incumbent.evidence.predicted_classes(), evidence.predicted_classes())
    return _maximum("max_churn", value, threshold, f"against version {incumbent.version}")


def check_rules(rules: RuleSet, evidence: Evidence, version: str, incumbent: Incumbent | None,
                protocol: Protocol = DEFAULT_PROTOCOL) -> tuple[Check, ...]:
    checks = []
    if rules.min_certified_fraction is not None:
        rule = rules.min_certified_fraction
        value = evidence.certified_fraction if rule.on == "point" else protocol.lower_end(evidence)
        detail = "point estimate" if rule.on == "point" else f"lower end of the policy's {1 - protocol.interval_alpha:.0%} interval"
        checks.append(_minimum("min_certified_fraction", value, rule.threshold, detail))
    if rules.max_arbitrariness is not None and evidence.arbitrariness is None:
        checks.append(Check("max_arbitrariness", None, rules.max_arbitrariness, False,
                            f"not measured: the {evidence.role} scored one model, arbitrariness needs the ensemble"))
    elif rules.max_arbitrariness is not None:
        checks.append(_maximum("max_arbitrariness", evidence.arbitrariness, rules.max_arbitrariness))
    if rules.min_accuracy is not None:
        checks.append(_minimum("min_accuracy", evidence.accuracy, rules.min_accuracy))
    if rules.max_churn is not None:
        checks.append(churn_check(rules.max_churn, evidence, version, incumbent))
    return tuple(checks)


def decide(
    model: str,
    version: str,
    target: Target,
    rules: RuleSet | None,
    evidence: Evidence | None,
    *,
    protocol: Protocol = DEFAULT_PROTOCOL,
    problems: tuple[str, ...] = (),
    incumbent: Incumbent | None = None,
    break_glass: str | None = None,
    break_glass_overrides_evidence: bool = False,
) -> Verdict:
    """The verdict on one promotion. ``problems`` (untrusted evidence, unreadable policy) refuse on their own.

    A break-glass justification turns a refusal on the rules into an allowed,
    flagged verdict; missing or untrusted evidence and protocol breaches only
    when ``break_glass_overrides_evidence``. The caller decides whether the
    policy permits break-glass at all and who armed it.
    """
    found = tuple(breaches(protocol, evidence)) if evidence is not None else ()
    checks = check_rules(rules, evidence, version, incumbent, protocol) if rules is not None and evidence is not None else ()
    passed = not problems and not found and all(c.passed for c in checks)
    evidence_sound = evidence is not None and not problems and not found
    glass_applies = break_glass is not None and (evidence_sound or break_glass_overrides_evidence)
    if break_glass is not None and not glass_applies and not passed:
        problems = problems + ("break-glass does not override missing, untrusted or off-protocol evidence "
                               "(the policy's break_glass.overrides_evidence is false)",)
    return Verdict(model, str(version), target, passed or glass_applies, checks, problems,
                   break_glass if glass_applies else None, breaches=found, evidence=evidence)
