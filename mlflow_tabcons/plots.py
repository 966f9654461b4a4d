"""The two figures logged with every ensemble: S against real multiplicity, and S by certificate."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def consistency_vs_range(consistency: np.ndarray, prediction_range: np.ndarray, *, window: int | None = None) -> Figure:
    """Scatter of S against the ensemble's prediction range, with a rolling mean of the range."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    axes.scatter(consistency, prediction_range, s=12, alpha=0.6, label="rows")
    order = np.argsort(consistency)
    window = window or max(3, len(order) // 10)
    rolling = pd.Series(prediction_range[order]).rolling(window, center=True, min_periods=1).mean()
    axes.plot(consistency[order], rolling, color="C3", linewidth=2, label=f"rolling mean ({window} rows)")
    axes.set_xlabel("consistency score S (reference member)")
    axes.set_ylabel("prediction range across members")
    axes.set_title("Does S predict fine-tuning multiplicity?")
    axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def consistency_histogram(consistency: np.ndarray, certified: np.ndarray, tau: float) -> Figure:
    """Distribution of S, certified rows and the others stacked, with tau marked."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    bins = np.linspace(min(-0.05, consistency.min()), 1.0, 31)
    axes.hist(
        [consistency[certified], consistency[~certified]],
        bins=bins,
        stacked=True,
        color=["C2", "C1"],
        label=[f"certified ({certified.sum()})", f"not certified ({(~certified).sum()})"],
    )
    axes.axvline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau:g}")
    axes.set_xlabel("consistency score S")
    axes.set_ylabel("rows")
    axes.set_title("Consistency scores by certificate")
    axes.legend(loc="upper left")
    figure.tight_layout()
    return figure
