"""Padding unpadded rows into a batch: one place, shared by training, the prefix cache and the baselines."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(rows: Sequence[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (ids) or 2-D (hidden states) rows; return the batch and its attention mask."""
    length = max(row.shape[0] for row in rows)
    batch = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return batch, mask
