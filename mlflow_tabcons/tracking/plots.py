"""The figures logged with every ensemble: S against real multiplicity, and S by certificate.

Figures are built on ``matplotlib.figure.Figure`` directly, never through
pyplot, so a long-running process (a benchmark, a server) does not keep every
figure it ever logged alive in pyplot's registry.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def new_figure(columns: int = 1, *, width: float = 6.0, height: float = 4.0, sharey: bool = False) -> tuple[Figure, np.ndarray]:
    """A figure of ``columns`` panels side by side and its axes (always an array)."""
    figure = Figure(figsize=(width, height), dpi=110)
    return figure, np.atleast_1d(figure.subplots(1, columns, sharey=sharey))


def scatter_with_rolling_mean(axes: Axes, x: np.ndarray, y: np.ndarray, *, window: int | None = None, label: bool = False) -> None:
    """Rows as points and, ordered by x, the rolling mean of y: does y fall as x rises?"""
    order = np.argsort(x)
    window = window or max(3, len(order) // 10)
    rolling = pd.Series(y[order]).rolling(window, center=True, min_periods=1).mean()
    axes.scatter(x, y, s=12, alpha=0.6, label="rows" if label else None)
    axes.plot(x[order], rolling, color="C3", linewidth=2, label=f"rolling mean ({window} rows)" if label else None)


def consistency_vs_range(consistency: np.ndarray, prediction_range: np.ndarray, *, window: int | None = None) -> Figure:
    """Scatter of S against the ensemble's prediction range, with a rolling mean of the range."""
    figure, (axes,) = new_figure()
    scatter_with_rolling_mean(axes, consistency, prediction_range, window=window, label=True)
    axes.set_xlabel("consistency score S (reference member)")
    axes.set_ylabel("prediction range across members")
    axes.set_title("Does S predict fine-tuning multiplicity?")
    axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def consistency_histogram(consistency: np.ndarray, certified: np.ndarray, tau: float) -> Figure:
    """Distribution of S, certified rows and the others stacked, with tau marked."""
    figure, (axes,) = new_figure()
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
