"""The measurement protocol a policy pins: what evidence must have been measured under to count.

The party being gated must not choose how its model is measured. Whatever
decides whether a row is "certified" (tau, alpha, the bound and its variance
bound, k, sigma, where the noise goes, rows, members and how many of them were
replaced) is checked here against the policy, and the interval behind
``on: lower`` is recomputed at the policy's level from the certified count,
never read at the evidence's own alpha. With no
``protocol:`` section, ``DEFAULT_PROTOCOL`` applies (documented in docs/gate.md).
Pure functions: no MLflow, no database.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mlflow_tabcons.gate.evidence import Evidence
from mlflow_tabcons.gate.keys import TRAINER, VERIFIER
from mlflow_tabcons.scoring.bounds import clopper_pearson

EVIDENCE_KINDS = ("trainer", "verified")
BOUND_NAMES = ("empirical-bernstein", "bernstein", "betting")
SIGMA_MODE_NAMES = ("relative", "absolute")
NOISE_NAMES = ("sphere", "gaussian")
PERTURB_NAMES = ("embeddings", "values", "hidden", "pooled")
# At the pooled site S is a monotone function of the margin (the head is linear): a confidence
# threshold under another name, so the default protocol does not accept it.
DEFAULT_PERTURBS = ("embeddings", "values", "hidden")
PRECISION_NAMES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Limits evidence must meet. ``interval_alpha`` sets the level (1 - alpha) of the interval ``on: lower`` reads.

    ``evidence``: ``trainer`` accepts trainer- or verifier-signed evidence (verifier first);
    ``verified`` only evidence the verifier measured, on the holdout ``holdout_sha256`` when set.
    ``min_members``, ``max_replaced_fraction`` and ``members_learned`` concern the trained ensemble, so the first
    two apply to trainer evidence (``max_replaced_fraction``: of the members measured, the most that may stand in
    for seeds replaced because they did not learn; replacing members lowers the multiplicity measured);
    a verifier scores the registered model alone and reports whether it beats the holdout's majority rate.
    """

    min_tau: float = 0.5
    max_alpha: float = 0.05
    interval_alpha: float = 0.05
    bounds: tuple[str, ...] = ("empirical-bernstein", "betting")
    min_k: int = 64
    min_eval_rows: int = 50
    min_members: int = 2
    max_replaced_fraction: float = 0.5
    sigma_modes: tuple[str, ...] = ("relative",)
    min_sigma: float = 0.5
    max_sigma: float | None = None
    noises: tuple[str, ...] = NOISE_NAMES
    perturbs: tuple[str, ...] = DEFAULT_PERTURBS
    precisions: tuple[str, ...] = PRECISION_NAMES
    allow_early_stop: bool = True
    members_learned: bool = True
    evidence: str = "trainer"
    holdout_sha256: str | None = None

    @classmethod
    def from_layers(cls, layers: list[Mapping[str, Any]]) -> Protocol:
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update(layer)
        return dataclasses.replace(cls(), **merged)

    @property
    def roles(self) -> tuple[str, ...]:
        """Whose evidence counts, in the order it is looked for."""
        return (VERIFIER,) if self.evidence == "verified" else (VERIFIER, TRAINER)

    def lower_end(self, evidence: Evidence) -> float:
        """The lower end of the certified fraction's Clopper-Pearson interval at the policy's level."""
        return clopper_pearson(evidence.certified_count, evidence.n_eval, self.interval_alpha)[0]


DEFAULT_PROTOCOL = Protocol()
PROTOCOL_KEYS = tuple(f.name for f in dataclasses.fields(Protocol))


def breaches(protocol: Protocol, evidence: Evidence) -> list[str]:
    """Every way the evidence was not measured under the protocol: the value and the policy's limit, one line each."""
    found: list[str] = []

    def breach(setting: str, value: Any, limit: str) -> None:
        found.append(f"protocol breach: {setting} {value} (policy: {limit})")

    if evidence.tau < protocol.min_tau:
        breach("tau", evidence.tau, f"at least {protocol.min_tau}; certified must mean the label survives")
    if evidence.alpha > protocol.max_alpha:
        breach("alpha", evidence.alpha, f"at most {protocol.max_alpha}")
    if evidence.bound not in protocol.bounds:
        breach("bound", repr(evidence.bound), f"one of {list(protocol.bounds)}")
    elif evidence.bound == "bernstein" and evidence.variance_bound < evidence.max_row_variance:
        breach("variance_bound", evidence.variance_bound,
               f"at least every row's sample variance, the largest of which is {evidence.max_row_variance:.4g}")
    if evidence.k < protocol.min_k:
        breach("k", evidence.k, f"at least {protocol.min_k}")
    if evidence.n_eval < protocol.min_eval_rows:
        breach("evaluation rows", evidence.n_eval, f"at least {protocol.min_eval_rows}")
    if evidence.sigma_mode not in protocol.sigma_modes:
        breach("sigma_mode", repr(evidence.sigma_mode), f"one of {list(protocol.sigma_modes)}")
    if evidence.sigma < protocol.min_sigma:
        breach("sigma", evidence.sigma, f"at least {protocol.min_sigma}")
    if protocol.max_sigma is not None and evidence.sigma > protocol.max_sigma:
        breach("sigma", evidence.sigma, f"at most {protocol.max_sigma}")
    if evidence.noise not in protocol.noises:
        breach("noise", repr(evidence.noise), f"one of {list(protocol.noises)}")
    if evidence.perturb not in protocol.perturbs:
        breach("perturb", repr(evidence.perturb), f"one of {list(protocol.perturbs)}")
    if evidence.precision not in protocol.precisions:
        breach("precision", repr(evidence.precision), f"one of {list(protocol.precisions)}")
    if evidence.early_stop and not protocol.allow_early_stop:
        breach("early_stop", "true", "false")
    if evidence.role == TRAINER and evidence.members < protocol.min_members:
        breach("members", evidence.members, f"at least {protocol.min_members}")
    if evidence.role == TRAINER and evidence.members_replaced > protocol.max_replaced_fraction * evidence.members:
        breach("members_replaced", f"{evidence.members_replaced} of {evidence.members}",
               f"at most {protocol.max_replaced_fraction:g} of the members")
    if protocol.members_learned and not evidence.members_learned:
        who = "the members must beat the majority rate on the rows they never saw" if evidence.role == TRAINER else (
            "the model must beat the majority rate on the holdout")
        breach("members_learned", "false", who)
    if protocol.evidence == "verified" and evidence.role != VERIFIER:
        breach("evidence", "signed by the trainer", "measured and signed by the verifier (`tabcons verify`)")
    if protocol.holdout_sha256 is not None and evidence.eval_digest != protocol.holdout_sha256:
        breach("holdout", evidence.eval_digest, f"the holdout {protocol.holdout_sha256}")
    return found
