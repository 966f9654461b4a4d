"""A short bounded load on a real `mlflow models serve`: concurrent clients, every answer a 200.

The full run (20 clients for 60 s, memory sampled, p95 latency) is
benchmarks/reliability_serving.py; this is its 4-client, 5-second version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from reliability_serving import load_test  # noqa: E402
from test_serving import registry, server  # noqa: E402,F401

pytestmark = pytest.mark.slow


def test_four_concurrent_clients_get_only_200s(server, diabetes_features):
    result = load_test(server, diabetes_features.to_dict(orient="records"), clients=4, seconds=5)
    assert result.requests_sent >= 4
    assert result.statuses == {"200": result.requests_sent}
    assert result.errors_5xx == result.connection_errors == 0
