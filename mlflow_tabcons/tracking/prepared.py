"""The rows a job reads (serialized and tokenized) and what a finished training job hands on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mlflow_tabcons.data.serialize import NUMBER_STYLES, NumberWords, RowSerializer
from mlflow_tabcons.data.tables import TabularDataset, few_shot, load_dataset, outside_few_shot, split_dataset, stratified_positions
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.checkpoints import resolve_model_path
from mlflow_tabcons.members.classifier import ANSWER_CUE, answer_token_ids, checkpoint_family, load_tokenizer, resolve_head
from mlflow_tabcons.members.families import GENERATIVE
from mlflow_tabcons.members.training import EncodedRows, EnsembleTrainer, Member, encode
from mlflow_tabcons.scoring.consistency import ConsistencyScores
from mlflow_tabcons.tracking.config import TrainingConfig


# The most rows the members' accuracy and learning test read (scored rows included): at a majority rate of 0.7
# a member 5 points above it passes on 1,000 rows nearly always, and a large table's prediction cost stays bounded.
MAX_TEST_ROWS = 1000


@dataclass
class PreparedData:
    """The dataset cut into what training and scoring read, serialized and tokenized.

    ``test`` holds the rows the members are judged on, the evaluation rows first:
    S is scored on the evaluation rows (``eval_rows`` of the test split, a stratified
    sample, since each costs k + 1 forward passes), while the members' accuracy and
    the test of whether they learned read every row no member trained on and nothing
    was chosen on, up to ``MAX_TEST_ROWS``: the test split and the training split's
    rows outside the few-shot sample (one pass each; on credit-g at 128 shots 722
    rows where the default scores 100, and the test's power grows with the rows).
    """

    dataset: TabularDataset
    serializer: RowSerializer
    tokenizer: Any
    train_frame: pd.DataFrame
    validation_frame: pd.DataFrame
    eval_frame: pd.DataFrame
    test_frame: pd.DataFrame
    train: EncodedRows
    validation: EncodedRows
    evaluation: EncodedRows
    test: EncodedRows
    numbers: str  # how the serializer reads numbers (data.serialize.NUMBER_STYLES)
    family: str  # the base model's: encoder, decoder or encoder-decoder (members/families.py)
    answer_ids: list[int] | None  # the verbalizer's answer tokens, one per class; None for a linear head


def default_number_style(dataset: TabularDataset) -> str:
    """Quantile words for a table without a data dictionary, numbers as they are for one with (docs/recipe.md)."""
    return "plain" if dataset.dictionary.columns else "words"


def number_styles(config: TrainingConfig, dataset: TabularDataset) -> tuple[str, ...]:
    """The number styles a job considers: the one asked for; under auto, every style for the recipe search."""
    if config.numbers != "auto":
        return (config.numbers,)
    if config.recipe == "auto":
        default = default_number_style(dataset)
        return (default, *(style for style in NUMBER_STYLES if style != default))
    return (default_number_style(dataset),)


def encode_frame(dataset: TabularDataset, serializer: RowSerializer, tokenizer: Any, frame: pd.DataFrame, max_length: int) -> EncodedRows:
    """Serialize and tokenize table rows; with a fast tokenizer, also mark each row's value tokens (perturb='values')."""
    if not getattr(tokenizer, "is_fast", False):  # no character offsets, no value-token masks
        return encode(tokenizer, serializer.serialize_frame(frame), dataset.encode_labels(frame), max_length)
    texts, spans = serializer.serialize_frame_with_spans(frame)
    return encode(tokenizer, texts, dataset.encode_labels(frame), max_length, spans)


def prepare_data(config: TrainingConfig) -> PreparedData:
    """The configured rows, serialized in the first of the job's number styles."""
    dataset = load_dataset(config.data, config.target, question=config.question, dictionary=config.dictionary)
    split = split_dataset(dataset, seed=config.split_seed)
    train_frame = few_shot(split.train, dataset.target, config.shots, seed=config.split_seed)
    if config.eval_rows and config.eval_rows > len(split.test):
        raise TabconsInputError(f"eval_rows={config.eval_rows} is larger than the {len(split.test)} test rows")
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path, checkpoint_family(model_path))
    unseen = outside_few_shot(split.train, dataset.target, config.shots, seed=config.split_seed)
    test_frame, n_eval = evaluation_rows_first(split.test, dataset.target, config.eval_rows, config.split_seed, unseen=unseen)
    return serialized(
        dataset, tokenizer, train_frame, split.validation, test_frame, n_eval, config, number_styles(config, dataset)[0]
    )


def evaluation_rows_first(
    test: pd.DataFrame,
    target: str,
    eval_rows: int,
    seed: int,
    max_rows: int = MAX_TEST_ROWS,
    unseen: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, int]:
    """The rows the members are judged on and how many of them are scored: the ``eval_rows`` scored test rows (a
    stratified sample; 0: the whole test split) first, then the other test rows and the ``unseen`` ones (rows
    of another split no member trained on), a random ``max_rows`` minus the scored ones of those on a large table.

    A few-shot member trains on a small sample of the training split; the rest of it is as unseen as the test
    split, so the test of whether the members learned reads it too (the evaluation of S keeps to the test split).
    """
    scored = stratified_positions(test, target, eval_rows, seed=seed, what="eval_rows") if eval_rows else np.arange(len(test))
    pool = test if unseen is None else pd.concat([test, unseen[test.columns]], ignore_index=True)
    rest = np.setdiff1d(np.arange(len(pool)), scored)
    if len(scored) + len(rest) > max_rows:
        rest = np.sort(np.random.default_rng(seed).permutation(rest)[: max(max_rows - len(scored), 0)])
    return pool.iloc[np.concatenate([scored, rest])].reset_index(drop=True), len(scored)


def serialized(
    dataset: TabularDataset,
    tokenizer: Any,
    train_frame: pd.DataFrame,
    validation_frame: pd.DataFrame,
    test_frame: pd.DataFrame,
    n_eval: int,
    config: TrainingConfig,
    numbers: str,
) -> PreparedData:
    """The row sets serialized with ``numbers`` (quantile words are cut on the training rows) and tokenized;
    the first ``n_eval`` test rows are the evaluation rows."""
    words = NumberWords.fit(train_frame, dataset.features) if numbers == "words" else None
    family = checkpoint_family(resolve_model_path(config.model))
    cue = ANSWER_CUE if family in GENERATIVE else None
    serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, config.template, words, answer_cue=cue)
    verbalizer = resolve_head(config.train.head, family) == "verbalizer"
    answer_ids = answer_token_ids(tokenizer, dataset.label_words) if verbalizer else None
    max_length = config.train.max_length

    def encoded(frame: pd.DataFrame) -> EncodedRows:
        return encode_frame(dataset, serializer, tokenizer, frame, max_length)

    test = encoded(test_frame)
    return PreparedData(
        dataset, serializer, tokenizer, train_frame, validation_frame, test_frame.iloc[:n_eval], test_frame,
        encoded(train_frame), encoded(validation_frame), test.subset(range(n_eval)), test, numbers, family, answer_ids,
    )


def with_numbers(data: PreparedData, config: TrainingConfig, numbers: str) -> PreparedData:
    """The same rows serialized in another number style."""
    if numbers == data.numbers:
        return data
    return serialized(
        data.dataset, data.tokenizer, data.train_frame, data.validation_frame, data.test_frame, len(data.evaluation),
        config, numbers,
    )


@dataclass
class TrainingOutcome:
    """What the job produced, for callers that go on (logging the model, evaluation)."""

    parent_run_id: str
    data: PreparedData
    trainer: EnsembleTrainer
    members: list[Member]
    member_probabilities: np.ndarray  # (m, n, C) on the evaluation rows (the first n of data.test)
    scores: ConsistencyScores
    metrics: dict[str, float]
    rows: pd.DataFrame
    eval_prefix: list[torch.Tensor] | None  # the frozen layers' output on the evaluation rows, shared by all members
    # whether the members beat the majority class on the unseen rows (metrics.classification.members_learned)
    members_learned: bool = False
    # members that ranked the validation rows no better than chance and were replaced (members/admission.py)
    members_replaced: int = 0
    model_version: Any = None  # the registered reference member (an MLflow ModelVersion), when registered
