"""The words a generative member answers with, one per class (docs/models.md, "Verbalizer").

A language model asked "Is this applicant a good credit risk? Yes or no?"
answers with a word; its class probabilities are the softmax over the scores
of one word per class. The words come from the data dictionary's ``answers``
section (label -> word). Without one, a binary table whose labels read as
yes/no (yes/no, true/false, 1/0) answers yes or no, and any other table
answers with its labels as the dictionary writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlflow_tabcons.data.serialize import DataDictionary, format_value
from mlflow_tabcons.errors import TabconsInputError

_YES = {"yes", "y", "true", "t", "1", "positive", "pos"}
_NO = {"no", "n", "false", "f", "0", "negative", "neg"}


def label_words(
    labels: Sequence[Any], target: str, dictionary: DataDictionary, answers: Mapping[str, str] | None = None
) -> list[str]:
    """One distinct answer word per label, in the labels' order."""
    rendered = [format_value(label) for label in labels]
    if answers:
        missing = [text for text in rendered if text not in answers]
        if missing:
            raise TabconsInputError(f"the data dictionary's answers section has no word for label(s) {missing}")
        words = [str(answers[text]).strip() for text in rendered]
    elif len(rendered) == 2 and _yes_no(rendered) is not None:
        words = _yes_no(rendered)
    else:
        words = [dictionary.value_text(target, label) for label in labels]
    lowered = [word.lower() for word in words]
    if any(not word for word in words) or len(set(lowered)) != len(lowered):
        raise TabconsInputError(f"answer words must be distinct and non-empty, got {words} for labels {rendered}")
    return words


def _yes_no(rendered: Sequence[str]) -> list[str] | None:
    lowered = [text.lower() for text in rendered]
    if lowered[0] in _YES and lowered[1] in _NO:
        return ["yes", "no"]
    if lowered[0] in _NO and lowered[1] in _YES:
        return ["no", "yes"]
    return None
