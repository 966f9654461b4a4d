"""The project's error type and the parameter checks shared by every module.

Errors are ``MlflowException`` (so MLflow's REST layer maps them to HTTP 400
and clients see the message) and also ``ValueError`` (so code written against
scikit-learn's conventions catches them as it always has).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED


class TabconsInputError(MlflowException, ValueError):
    """Bad input from the user: a parameter, a table, a request body."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class TabconsResourceError(MlflowException):
    """A valid request the device cannot run: one forward pass does not fit its memory (HTTP 429 when served)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=RESOURCE_EXHAUSTED)


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an int, refusing bools, fractions and out-of-range values."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float)):
        raise TabconsInputError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise TabconsInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise TabconsInputError(f"{name} must be {bounds}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the stated interval."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TabconsInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise TabconsInputError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise TabconsInputError(f"{name} must be in {interval}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        raise TabconsInputError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_array(
    name: str,
    value: Any,
    *,
    ndim: int,
    low: float | None = None,
    high: float | None = None,
    min_shape: tuple[int, ...] | None = None,
    dtype: type = np.float64,
) -> np.ndarray:
    """Return ``value`` as a finite array of ``ndim`` dimensions within [low, high]."""
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TabconsInputError(f"{name} must be numeric: {error}") from None
    if array.ndim != ndim:
        raise TabconsInputError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if min_shape is not None:
        for axis, (size, least) in enumerate(zip(array.shape, min_shape)):
            if size < least:
                raise TabconsInputError(
                    f"{name} needs at least {least} entries along axis {axis}, got shape {array.shape}"
                )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise TabconsInputError(f"{name} contains NaN or infinite values")
    if low is not None and array.size and array.min() < low:
        raise TabconsInputError(f"{name} must be >= {low}, found {array.min()}")
    if high is not None and array.size and array.max() > high:
        raise TabconsInputError(f"{name} must be <= {high}, found {array.max()}")
    return array
