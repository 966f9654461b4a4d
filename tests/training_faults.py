"""Members whose training raises on demand: for tests of failed seeds, replacements and resumes."""

from __future__ import annotations

import pytest

from mlflow_tabcons.members.training import EnsembleTrainer


def flaky_training(monkeypatch: pytest.MonkeyPatch, faulty: set[int]) -> list[int]:
    """Make training raise for the seeds in ``faulty`` (clear the set to heal them); returns every seed trained, in order."""
    original = EnsembleTrainer.train_member
    trained: list[int] = []

    def flaky(self, seed, **kwargs):
        trained.append(seed)
        if seed in faulty:
            raise RuntimeError(f"simulated fault in seed {seed}")
        return original(self, seed, **kwargs)

    monkeypatch.setattr(EnsembleTrainer, "train_member", flaky)
    return trained
