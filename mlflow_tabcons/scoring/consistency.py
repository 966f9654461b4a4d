"""The consistency score S, its certificate, and the certified-consistent fraction.

docs/method.md, "The measure": for a row x with token embeddings E(x), draw k
neighbours E(x) + r * u_i on the sphere of radius r around E(x) (padding
excluded), and average Z_i = g(x_i) - |g(x) - g(x_i)|, where g is the
probability of the class predicted at x. The certificate is a lower confidence
bound on E[Z]; a row is certified consistent when it exceeds tau.

Reproducibility: neighbour i of a row is drawn from a generator seeded by
(seed, the row's token ids, i), so a row's score depends on neither its
position in a request, nor the batching, nor whether sampling stopped early.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mlflow_tabcons.scoring import memory
from mlflow_tabcons.scoring.bounds import BOUNDS, betting_lcb, betting_ucb, clopper_pearson, lower_confidence_bound
from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int

SIGMA_MODES = ("relative", "absolute")
NOISES = ("sphere", "gaussian")
# Where the neighbours are drawn (docs/method.md, "Where the noise goes"): every input token
# embedding (the paper's choice), only the embeddings of the row's value tokens, the hidden state
# entering the first fine-tuned layer, or the pooled sentence vector the head reads.
PERTURB_SITES = ("embeddings", "values", "hidden", "pooled")
# Sites a backend that only knows input embeddings (``embed``/``probabilities``) can serve.
INPUT_SITES = ("embeddings", "values")
PRECISIONS = ("float32", "bfloat16")
MAX_K = 100_000
# Rounds of sampling when early stopping: the bound is checked after each.
# Rounds grow by a quarter (in steps of 8), so a row decided after n samples
# draws at most about n/4 more; doubling would waste up to n.
_FIRST_ROUND = 16
_ROUND_STEP = 8
_ROUND_GROWTH = 1.25


@dataclass(frozen=True)
class ScorerSettings:
    """How a prediction is scored and certified. Travels with the packaged model.

    ``sigma`` is the neighbourhood radius: a share of the row's own size
    (``typical_norm``: ||E(x)||_F unless one token dwarfs the rest) when
    ``sigma_mode`` is ``relative`` (the default: embedding scales differ
    between models and rows), in embedding units when ``absolute``.
    ``early_stop`` (needs the anytime-valid ``betting`` bound) stops sampling a
    row as soon as its bound clears tau or its upper bound falls below it.
    ``precision`` is how a PyTorch model runs the neighbour passes (see ``TorchBackend``).
    ``max_batch_tokens`` caps the padded tokens of one forward pass; None sizes
    it to the device (scoring/memory.py: the free memory on CUDA, 16384 elsewhere).
    ``perturb`` is where the noise goes (``PERTURB_SITES``); ``values`` needs each
    row's value-token mask, ``hidden`` and ``pooled`` need a backend with ``represent``.
    sigma is relative to the norm of what is perturbed there.
    """

    k: int = 128
    sigma: float = 0.5
    sigma_mode: str = "relative"
    alpha: float = 0.05
    tau: float = 0.5
    bound: str = "empirical-bernstein"
    variance_bound: float = 1.0
    noise: str = "sphere"
    early_stop: bool = False
    seed: int = 0
    max_batch_tokens: int | None = None
    precision: str = "float32"
    perturb: str = "embeddings"

    def __post_init__(self) -> None:
        check_int("k", self.k, minimum=2, maximum=MAX_K)
        check_float("sigma", self.sigma, low=0.0, low_open=True)
        check_choice("sigma_mode", self.sigma_mode, SIGMA_MODES)
        check_float("alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float("tau", self.tau, low=-1.0, high=1.0, high_open=True)
        check_choice("bound", self.bound, BOUNDS)
        check_float("variance_bound", self.variance_bound, low=0.0, high=1.0, low_open=True)
        check_choice("noise", self.noise, NOISES)
        if not isinstance(self.early_stop, (bool, np.bool_)):
            raise TabconsInputError(f"early_stop must be true or false, got {self.early_stop!r}")
        if self.early_stop and self.bound != "betting":
            raise TabconsInputError(
                f"early_stop needs the anytime-valid bound 'betting'; the {self.bound!r} bound holds only at a k fixed in advance"
            )
        check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        if self.max_batch_tokens is not None:
            check_int("max_batch_tokens", self.max_batch_tokens, minimum=1)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("perturb", self.perturb, PERTURB_SITES)

    def with_overrides(self, **overrides: Any) -> ScorerSettings:
        """A copy with some fields replaced (and validated); None values are ignored."""
        known = set(asdict(self))
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TabconsInputError(f"unknown scorer setting(s) {unknown}; known: {sorted(known)}")
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProbabilityBackend(Protocol):
    """What the scorer needs from a model; PyTorch and ONNX Runtime both provide it.

    A backend may also have ``token_budget(longest) -> int``: the padded tokens
    per forward pass that fit its device (``TorchBackend``); without it, and
    without a set ``max_batch_tokens``, batches hold ``memory.DEFAULT_BATCH_TOKENS``.
    """

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(L,) token ids -> (L, d) input embeddings E(x)."""

    def probabilities(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """(B, L, d) embeddings and (B, L) mask -> (B, C) class probabilities."""


class SiteBackend(ProbabilityBackend, Protocol):
    """A backend that can also perturb inside the model (the ``hidden`` and ``pooled`` sites)."""

    def represent(self, input_ids: torch.Tensor, site: str) -> torch.Tensor:
        """(L,) token ids -> (L', d) what is perturbed at ``site`` (L' = 1 for ``pooled``)."""

    def probabilities_at(self, site: str, states: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """(B, L', d) states at ``site`` and (B, L') mask -> (B, C) class probabilities."""


class TorchBackend:
    """The scorer's view of a ``TabularClassifier`` in PyTorch.

    ``precision="bfloat16"`` runs the forward passes under bfloat16 autocast
    (embeddings, neighbours and probabilities stay float32). Where the matrix
    unit has bfloat16 (AMX on recent Xeons, any recent GPU) this is several
    times faster; the probabilities move by about 1e-2, so a row whose bound
    sits right at tau can change its certificate (benchmarks/bench_scoring.py
    measures how often).

    ``hidden_depth`` is how many bottom layers the fine-tuning left frozen: the
    ``hidden`` site perturbs the hidden state entering layer ``hidden_depth``, so
    each neighbour pass runs only the layers above it.
    """

    def __init__(self, classifier: torch.nn.Module, device: str = "cpu", precision: str = "float32", *, hidden_depth: int = 0) -> None:
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.classifier = classifier.to(device).eval()
        self.device = device
        self.hidden_depth = check_int("hidden_depth", hidden_depth, minimum=0)

    def token_budget(self, longest: int) -> int:
        """Padded tokens per forward pass that fit this device for rows of up to ``longest`` tokens."""
        return memory.token_budget(self.classifier.config, self.device, self.precision, longest)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier.embed(input_ids.to(self.device)[None])[0].float().cpu()

    @torch.inference_mode()
    def probabilities(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        return self.probabilities_at("embeddings", embeddings, attention_mask)

    @torch.inference_mode()
    def represent(self, input_ids: torch.Tensor, site: str) -> torch.Tensor:
        check_choice("perturb", site, PERTURB_SITES)
        ids = input_ids.to(self.device)[None]
        if site in INPUT_SITES:
            return self.classifier.embed(ids)[0].float().cpu()
        mask = torch.ones_like(ids)
        if site == "hidden":
            return self.classifier.frozen_prefix(ids, mask, self.hidden_depth)[0].float().cpu()
        return self.classifier.pooled_from_embeddings(self.classifier.embed(ids), mask).float().cpu()

    @torch.inference_mode()
    def probabilities_at(self, site: str, states: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        check_choice("perturb", site, PERTURB_SITES)
        states, attention_mask = states.to(self.device), attention_mask.to(self.device)
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            if site in INPUT_SITES:
                logits = self.classifier.logits_from_embeddings(states, attention_mask)
            elif site == "hidden":
                logits = self.classifier.logits_from_prefix(states, attention_mask, self.hidden_depth)
            else:
                logits = self.classifier.logits_from_pooled(states[:, 0])
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()


@dataclass
class ConsistencyScores:
    """Per-row results of scoring; arrays of length n (``probabilities`` is (n, C))."""

    predicted: np.ndarray
    probabilities: np.ndarray
    confidence: np.ndarray
    consistency: np.ndarray
    lcb: np.ndarray
    certified: np.ndarray
    samples: np.ndarray
    settings: ScorerSettings
    variance: np.ndarray | None = None  # per-row sample variance of Z (what a stated Bernstein variance bound must cover)

    def certified_fraction(self) -> tuple[float, float, float]:
        """Share of certified rows and its Clopper-Pearson interval at the scorer's alpha."""
        count = int(self.certified.sum())
        low, high = clopper_pearson(count, len(self.certified), self.settings.alpha)
        return count / len(self.certified), low, high

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "predicted_class": self.predicted,
                "confidence": self.confidence,
                "consistency": self.consistency,
                "consistency_lcb": self.lcb,
                "certified": self.certified,
                "neighbours": self.samples,
            }
        )


def row_key(seed: int, input_ids: torch.Tensor) -> bytes:
    """What a row's neighbours are drawn from: the scorer's seed and the row's own token ids."""
    return hashlib.blake2b(seed.to_bytes(8, "little") + input_ids.numpy().astype("<i8").tobytes(), digest_size=16).digest()


def _neighbour_seed(key: bytes, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(key + index.to_bytes(8, "little"), digest_size=8).digest(), "little") >> 1


def neighbour_directions(
    key: bytes, start: int, count: int, shape: tuple[int, int], noise: str = "sphere", positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Directions of neighbours start..start+count-1 of a row: unit Frobenius norm (sphere),
    or Gaussian scaled so the expected squared norm is 1. Each depends only on (key, index).
    With ``positions`` (an (L,) bool mask) only those positions move; the norm is over them."""
    out = torch.empty((count, *shape))
    generator = torch.Generator()
    for j in range(count):  # one seeded draw per neighbour, written in place
        torch.randn(shape, generator=generator.manual_seed(_neighbour_seed(key, start + j)), out=out[j])
    entries = shape[0] * shape[1]
    if positions is not None:
        out *= positions.to(out.dtype)[None, :, None]
        entries = int(positions.sum()) * shape[1]
    if noise == "sphere":
        return out / out.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    return out / float(max(entries, 1)) ** 0.5


def typical_norm(states: torch.Tensor) -> float:
    """The Frobenius norm ``states`` (n, d) would have if every row were as long as the median one: sqrt(n) * median.

    Equal to ||states||_F within a few percent where token norms are alike (input embeddings,
    encoders' hidden states). Decoders' hidden states carry an attention-sink token tens of
    times longer than the rest (SmolLM2 entering layer 27: 21,964 against a median of 544),
    which would make ||.||_F, and with it a relative radius, that one token's size: the
    neighbours of every other token would be pure noise.
    """
    norms = states.float().norm(dim=-1)
    return float(norms.median()) * len(norms) ** 0.5


def neighbourhood_radius(embedding: torch.Tensor, settings: ScorerSettings, positions: torch.Tensor | None = None) -> float:
    """sigma itself (absolute) or sigma times the typical norm of what is perturbed (relative, ``typical_norm``)."""
    if settings.sigma_mode == "relative":
        moved = embedding if positions is None else embedding[positions]
        return settings.sigma * typical_norm(moved)
    return settings.sigma


@dataclass
class _Row:
    embedding: torch.Tensor
    key: bytes
    radius: float
    predicted: int
    confidence: float
    z: list[float]
    positions: torch.Tensor | None = None  # the value tokens, where only they move

    def neighbours(self, count: int, noise: str) -> torch.Tensor:
        """The next ``count`` neighbours E(x) + r u_i of this row."""
        directions = neighbour_directions(self.key, len(self.z), count, tuple(self.embedding.shape), noise, self.positions)
        return self.embedding[None] + self.radius * directions


class ConsistencyScorer:
    """Scores rows with any ``ProbabilityBackend`` under fixed ``ScorerSettings``."""

    def __init__(self, backend: ProbabilityBackend, settings: ScorerSettings | None = None) -> None:
        self.backend = backend
        self.settings = settings or ScorerSettings()

    @property
    def settings(self) -> ScorerSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: ScorerSettings) -> None:
        if settings.perturb not in INPUT_SITES and not hasattr(self.backend, "represent"):
            raise TabconsInputError(
                f"perturb={settings.perturb!r} needs a backend that runs the model from inside "
                f"(the torch backend); {type(self.backend).__name__} perturbs only at {list(INPUT_SITES)}"
            )
        self._settings = settings

    def _represent(self, input_ids: torch.Tensor) -> torch.Tensor:
        site = self.settings.perturb
        return self.backend.embed(input_ids) if site in INPUT_SITES else self.backend.represent(input_ids, site)

    def _probabilities(self, states: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        site = self.settings.perturb
        if site in INPUT_SITES:
            return self.backend.probabilities(states, attention_mask)
        return self.backend.probabilities_at(site, states, attention_mask)

    def predict_proba(self, input_ids: Sequence[torch.Tensor]) -> np.ndarray:
        """Plain class probabilities (n, C) of unperturbed rows: the fast path without a score."""
        return self._forward_rows([self._represent(ids) for ids in input_ids])

    def _token_budget(self, embeddings: Sequence[torch.Tensor]) -> memory.TokenBudget:
        """The user's ``max_batch_tokens``, else what the backend says fits its device, else the CPU default."""
        tokens = self.settings.max_batch_tokens
        if tokens is None:
            sized = getattr(self.backend, "token_budget", None)  # optional: backends without it get the default
            longest = max(e.shape[0] for e in embeddings)
            tokens = sized(longest) if sized is not None else memory.DEFAULT_BATCH_TOKENS
        return memory.TokenBudget(tokens)

    def _forward_rows(self, embeddings: Sequence[torch.Tensor], budget: memory.TokenBudget | None = None) -> np.ndarray:
        budget = budget or self._token_budget(embeddings)
        jobs = [(i, 1, e.shape[0]) for i, e in enumerate(embeddings)]
        parts: list[tuple[list[int], np.ndarray]] = []

        def forward(batch: list[memory.Job]) -> None:
            parts.append(([row for row, _, _ in batch], self._forward([embeddings[row] for row, _, _ in batch])))

        budget.run(jobs, forward)
        out = np.empty((len(embeddings), parts[0][1].shape[1]))
        for rows, probabilities in parts:
            out[rows] = probabilities
        return out

    def _forward(self, stacks: Sequence[torch.Tensor]) -> np.ndarray:
        """Forward (L_i, d) rows or (m_i, L_i, d) neighbour stacks as one padded batch."""
        stacks = [s[None] if s.dim() == 2 else s for s in stacks]
        count = sum(s.shape[0] for s in stacks)
        length = max(s.shape[1] for s in stacks)
        batch = torch.zeros((count, length, stacks[0].shape[2]))
        mask = torch.zeros((count, length), dtype=torch.long)
        at = 0
        for stack in stacks:
            batch[at : at + stack.shape[0], : stack.shape[1]] = stack
            mask[at : at + stack.shape[0], : stack.shape[1]] = 1
            at += stack.shape[0]
        return self._probabilities(batch, mask)

    def score(
        self, input_ids: Sequence[torch.Tensor], *, value_masks: Sequence[torch.Tensor] | None = None, progress: bool = False
    ) -> ConsistencyScores:
        """Score every row: prediction, S, the lower bound and the certified flag.

        ``value_masks`` (one (L,) bool mask per row: its value tokens) is what
        the ``values`` site perturbs; other sites ignore it.
        """
        settings = self.settings
        if len(input_ids) == 0:
            raise TabconsInputError("nothing to score: the input has no rows")
        positions = self._value_positions(input_ids, value_masks)
        embeddings = [self._represent(ids) for ids in input_ids]
        budget = self._token_budget(embeddings)
        probabilities = self._forward_rows(embeddings, budget)
        predicted = probabilities.argmax(axis=1)
        rows = []
        for i, (ids, embedding) in enumerate(zip(input_ids, embeddings)):
            c = int(predicted[i])
            radius = neighbourhood_radius(embedding, settings, positions[i])
            rows.append(_Row(embedding, row_key(settings.seed, ids), radius, c, float(probabilities[i, c]), [], positions[i]))
        decided_lcb = np.full(len(rows), np.nan)
        active = list(range(len(rows)))
        bar = tqdm(total=len(rows) * settings.k, desc="scoring", unit="pass", disable=not progress or None)

        def sample(batch: list[memory.Job]) -> None:
            self._sample(rows, batch)
            bar.update(sum(count for _, count, _ in batch))

        for target in self._rounds():
            budget.run([(i, target - len(rows[i].z), rows[i].embedding.shape[0]) for i in active], sample)
            if settings.early_stop:
                active = self._still_undecided(rows, active, decided_lcb)
                if not active:
                    break
        bar.update(bar.total - bar.n)
        bar.close()
        return self._results(rows, probabilities, decided_lcb)

    def _value_positions(
        self, input_ids: Sequence[torch.Tensor], value_masks: Sequence[torch.Tensor] | None
    ) -> list[torch.Tensor | None]:
        if self.settings.perturb != "values":
            return [None] * len(input_ids)
        if value_masks is None:
            raise TabconsInputError("perturb='values' needs each row's value-token mask (value_masks), from the serializer's value spans")
        if len(value_masks) != len(input_ids):
            raise TabconsInputError(f"value_masks has {len(value_masks)} rows but input_ids has {len(input_ids)}")
        positions = []
        for i, (ids, mask) in enumerate(zip(input_ids, value_masks)):
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != ids.shape:
                raise TabconsInputError(f"value mask of row {i} has shape {tuple(mask.shape)}, its token ids {tuple(ids.shape)}")
            if not mask.any():
                raise TabconsInputError(f"row {i} has no value tokens to perturb (every value missing or truncated)")
            positions.append(mask)
        return positions

    def _rounds(self) -> list[int]:
        """Sample counts after which the bound is checked: 16, 24, 32, 40, 56, 72, 96, ... k (or just k)."""
        k = self.settings.k
        if not self.settings.early_stop:
            return [k]
        rounds, total = [], _FIRST_ROUND
        while total < k:
            rounds.append(total)
            total = max(total + _ROUND_STEP, math.ceil(total * _ROUND_GROWTH / _ROUND_STEP) * _ROUND_STEP)
        return rounds + [k]

    def _sample(self, rows: list[_Row], batch: list[tuple[int, int, int]]) -> None:
        noise = self.settings.noise
        stacks = []
        for i, count, _ in batch:  # a row appears at most once per batch
            stacks.append(rows[i].neighbours(count, noise))
        probabilities = self._forward(stacks)
        at = 0
        for i, count, _ in batch:
            row = rows[i]
            g = probabilities[at : at + count, row.predicted]
            row.z.extend((g - np.abs(row.confidence - g)).tolist())
            at += count

    def _still_undecided(self, rows: list[_Row], active: list[int], decided_lcb: np.ndarray) -> list[int]:
        alpha, tau = self.settings.alpha, self.settings.tau
        by_count: dict[int, list[int]] = {}
        for i in active:
            by_count.setdefault(len(rows[i].z), []).append(i)
        undecided = []
        for group in by_count.values():
            z = np.array([rows[i].z for i in group])
            lower, upper = betting_lcb(z, alpha), betting_ucb(z, alpha)
            for i, lo, hi in zip(group, lower, upper):
                if lo > tau or hi < tau:
                    decided_lcb[i] = lo
                else:
                    undecided.append(i)
        return undecided

    def _results(self, rows: list[_Row], probabilities: np.ndarray, decided_lcb: np.ndarray) -> ConsistencyScores:
        settings = self.settings
        lcb = decided_lcb.copy()
        pending = [i for i in range(len(rows)) if np.isnan(lcb[i])]
        by_count: dict[int, list[int]] = {}
        for i in pending:
            by_count.setdefault(len(rows[i].z), []).append(i)
        for group in by_count.values():
            z = np.array([rows[i].z for i in group])
            lcb[group] = lower_confidence_bound(z, settings.alpha, settings.bound, variance_bound=settings.variance_bound)
        return ConsistencyScores(
            predicted=np.array([row.predicted for row in rows]),
            probabilities=probabilities,
            confidence=np.array([row.confidence for row in rows]),
            consistency=np.array([np.mean(row.z) for row in rows]),
            lcb=lcb,
            certified=lcb > settings.tau,
            samples=np.array([len(row.z) for row in rows]),
            settings=settings,
            variance=np.array([np.var(row.z, ddof=1) if len(row.z) > 1 else 0.0 for row in rows]),
        )
