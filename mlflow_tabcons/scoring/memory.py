"""How many padded tokens one forward pass of the scorer holds, and what it does when they do not fit.

A batch is a list of jobs ``(row, count, length)``: ``count`` passes of a row
of ``length`` tokens, padded to the batch's longest row. ``pack`` fills batches
up to a token budget. The budget is the user's ``max_batch_tokens`` when set;
otherwise ``DEFAULT_BATCH_TOKENS`` on the CPU, and on a CUDA device what fits
the free memory (``torch.cuda.mem_get_info``) at the model's per-token
activation cost (``token_budget``).

The estimate can be wrong (other processes, allocator fragmentation), so an
out-of-memory error during a batch halves the budget and retries that batch,
as accelerate's ``find_executable_batch_size`` does for a whole function; a
single pass that still does not fit is refused with what to change. Scores do
not depend on the batching: neighbour i of a row is drawn from the row's key
and i, and a row's passes run in index order.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mlflow_tabcons.errors import TabconsResourceError

logger = logging.getLogger(__name__)

Job = tuple[int, int, int]  # (row, passes, tokens per pass)

# Tokens per batch on the CPU, or where the backend cannot say what fits.
DEFAULT_BATCH_TOKENS = 16384
# Ceiling of a sized budget: far past what saturates a GPU, while the batch is still built in host memory.
MAX_SIZED_TOKENS = 2**18
# Share of the free memory a batch may use; the rest is for the allocator's fragmentation and kernel workspaces.
FREE_SHARE = 0.8


def pack(jobs: Sequence[Job], max_tokens: int) -> list[list[Job]]:
    """Pack jobs into batches of at most ``max_tokens`` padded tokens (one pass per batch at least)."""
    batches: list[list[Job]] = []
    current: list[Job] = []
    longest = rows = 0
    for row, count, length in sorted(jobs, key=lambda job: job[2]):
        while count:
            room = max_tokens // max(longest, length) - rows
            if room <= 0 and current:
                batches.append(current)
                current, longest, rows = [], 0, 0
                continue
            take = min(count, max(room, 1))
            current.append((row, take, length))
            rows += take
            longest = max(longest, length)
            count -= take
    if current:
        batches.append(current)
    return batches


def free_memory(device: str) -> int | None:
    """Free bytes on a CUDA device (None on any other device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def bytes_per_token(config: Any, precision: str, longest: int) -> int:
    """Activation bytes one padded token costs in an inference-mode forward pass.

    The float32 input embedding, plus one layer's working set: the residual
    stream, queries, keys, values and attention output (about 6 x hidden), the
    MLP's intermediate activations (about 3 x intermediate, gated MLPs keep
    three), and a row of attention scores and probabilities (2 x heads x
    longest, in case the kernel materializes them). The weights are resident
    before the free memory is read, and inference mode frees each layer's
    activations before the next layer runs, so the depth does not enter.
    """
    hidden = int(config.hidden_size)
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or getattr(config, "n_inner", None)
    intermediate = int(intermediate or 4 * hidden)
    heads = int(config.num_attention_heads)
    element = 2 if precision == "bfloat16" else 4
    return 4 * hidden + element * (6 * hidden + 3 * intermediate + 2 * heads * longest)


def token_budget(config: Any, device: str, precision: str, longest: int) -> int:
    """Padded tokens per batch for this model on ``device``: sized from free memory on CUDA, the default elsewhere."""
    free = free_memory(device)
    if free is None:
        return DEFAULT_BATCH_TOKENS
    tokens = int(FREE_SHARE * free) // bytes_per_token(config, precision, longest)
    return max(longest, min(MAX_SIZED_TOKENS, tokens))


def _merged(jobs: Sequence[Job]) -> list[Job]:
    """One job per row, its passes summed: a row never appears twice in one batch."""
    merged: dict[int, list[int]] = {}
    for row, count, length in jobs:
        merged.setdefault(row, [0, length])[0] += count
    return [(row, count, length) for row, (count, length) in merged.items()]


def _release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TokenBudget:
    """The padded tokens per batch, halved for good whenever a batch runs out of memory."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def run(self, jobs: Sequence[Job], forward: Callable[[list[Job]], None]) -> None:
        """Call ``forward`` on batches of ``jobs`` within the budget; repack and retry after an out-of-memory error.

        ``forward`` must leave no trace when it raises (the scorer records a
        batch's scores only after its forward pass returns).
        """
        pending = pack(jobs, self.tokens)
        while pending:
            batch = pending[0]
            try:
                forward(batch)
                pending.pop(0)
                continue
            except torch.OutOfMemoryError as error:  # torch.cuda.OutOfMemoryError is the same class
                self._shrink(batch, error)
            _release_cached_memory()  # outside the handler, so the failed pass's tensors are no longer referenced
            pending = pack(_merged([job for waiting in pending for job in waiting]), self.tokens)

    def _shrink(self, batch: list[Job], error: Exception) -> None:
        passes = sum(count for _, count, _ in batch)
        longest = max(length for _, _, length in batch)
        if passes == 1:
            raise TabconsResourceError(
                f"one forward pass of {longest} tokens does not fit in the device's memory even alone: "
                "lower max_length (shorter rows), use precision='bfloat16', or score on a device with more free memory"
            ) from error
        self.tokens = max(1, passes * longest // 2)
        logger.warning(
            "out of memory in a batch of %d passes x %d tokens; retrying with max_batch_tokens=%d "
            "(set max_batch_tokens lower to start there)", passes, longest, self.tokens,
        )
