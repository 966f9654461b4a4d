"""Which trained members join the ensemble (docs/recipe.md, "Members that did not learn").

Multiplicity is about models that are equally good and still disagree. A
member that ranks the validation rows no better than chance did not learn the
task (on credit-g at 128 shots one seed in ten stays at a validation AUROC of
0.52-0.56 every epoch while its peers reach 0.60-0.71), and its disagreements
with the others are noise. Such a member is replaced by one trained with the
next unused seed, at most ``replacements`` times per ensemble. The test reads
the validation rows only, never the evaluation rows the ensemble is judged
on; every replaced seed is logged, and the gate's protocol bounds how many an
ensemble may have had (``max_replaced_fraction``), because replacing members
lowers the multiplicity measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlflow_tabcons.errors import check_float, check_int
from mlflow_tabcons.metrics.classification import auroc, ranking_pvalue

# A member is admitted when a one-sided permutation test rejects "ranks no better than chance" at this level.
ADMISSION_LEVEL = 0.05
# The most replacements a job may be allowed (``--max-replacements``): beyond that it is a search for seeds.
MAX_REPLACEMENTS = 1000


def default_replacements(members: int) -> int:
    """At most half the ensemble (at least one member) may be replaced: beyond that the rule would be choosing the ensemble."""
    check_int("members", members, minimum=1)
    return max(1, members // 2)


@dataclass(frozen=True)
class Admission:
    """The test of one member on the validation rows."""

    admitted: bool
    validation_auroc: float
    pvalue: float


def admit(labels: np.ndarray | None, probabilities: np.ndarray | None, level: float = ADMISSION_LEVEL) -> Admission:
    """Admit a member whose validation probabilities rank the rows better than chance at ``level``.

    Without validation rows (None) there is nothing to test, and the member is admitted.
    """
    check_float("admission level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    if labels is None or probabilities is None or len(probabilities) == 0:
        return Admission(True, float("nan"), float("nan"))
    pvalue = ranking_pvalue(labels, probabilities)
    return Admission(pvalue <= level, auroc(labels, probabilities), pvalue)
