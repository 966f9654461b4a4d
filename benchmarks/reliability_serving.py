"""Serving under load and under hostile input: a real `mlflow models serve` on 127.0.0.1.

Load: C client threads send 1-row requests of distinct diabetes rows for T
seconds; every status is counted, latency is client-side wall time, and the
server's resident memory (process tree) is sampled every second. Fuzz: the
hypothesis strategy of tests/test_fuzz_serving.py sends N hostile bodies;
every answer must be 200 or 4xx and the answers for valid rows must not
change. Both write their section of reliability.json.

    python benchmarks/reliability_serving.py [--clients 20] [--seconds 60] [--fuzz 500] [--model minilm]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from bench_serving import Server  # noqa: E402
from common import RESULTS, machine, update_result  # noqa: E402


@dataclass
class LoadResult:
    clients: int
    seconds: float
    requests_sent: int
    statuses: dict[str, int]
    errors_5xx: int
    connection_errors: int
    latency_p50_s: float
    latency_p95_s: float
    latency_max_s: float
    requests_per_second: float
    rss_mb_first_10s: float = 0.0
    rss_mb_last_10s: float = 0.0
    rss_mb_max: float = 0.0
    rss_samples: list[float] = field(default_factory=list)


def _server_rss_mb(pid: int) -> float:
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def load_test(url: str, rows: list[dict], *, clients: int, seconds: float, server_pid: int | None = None) -> LoadResult:
    """``clients`` threads posting one row each, back to back, for ``seconds``."""
    statuses: collections.Counter = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    memory: list[float] = []

    def client(index: int) -> None:
        session = requests.Session()
        sent = 0
        while time.monotonic() < stop:
            row = rows[(index * 7919 + sent) % len(rows)]
            sent += 1
            started = time.perf_counter()
            try:
                answer = session.post(f"{url}/invocations", json={"dataframe_records": [row]}, timeout=300)
                status = str(answer.status_code)
            except requests.RequestException as error:
                status = f"connection: {type(error).__name__}"
            with lock:
                statuses[status] += 1
                latencies.append(time.perf_counter() - started)

    def sample_memory() -> None:
        while time.monotonic() < stop:
            memory.append(_server_rss_mb(server_pid))
            time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    if server_pid is not None:
        threads.append(threading.Thread(target=sample_memory))
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    values = np.array(latencies)
    result = LoadResult(
        clients=clients, seconds=round(elapsed, 1), requests_sent=len(latencies), statuses=dict(statuses),
        errors_5xx=sum(n for s, n in statuses.items() if s.startswith("5")),
        connection_errors=sum(n for s, n in statuses.items() if s.startswith("connection")),
        latency_p50_s=round(float(np.percentile(values, 50)), 4), latency_p95_s=round(float(np.percentile(values, 95)), 4),
        latency_max_s=round(float(values.max()), 4), requests_per_second=round(len(latencies) / elapsed, 2),
    )
    if memory:
        result.rss_samples = [round(m, 1) for m in memory]
        result.rss_mb_first_10s = round(float(np.nanmax(memory[:10])), 1)
        result.rss_mb_last_10s = round(float(np.nanmax(memory[-10:])), 1)
        result.rss_mb_max = round(float(np.nanmax(memory)), 1)
    return result


def fuzz_test(url: str, features, examples: int) -> dict:
    """Send ``examples`` hostile bodies; count answers by status; check valid answers before and after."""
    from hypothesis import HealthCheck, given, settings
    from test_fuzz_serving import check_answer, hostile_bodies, post_raw, valid_answer

    statuses: collections.Counter = collections.Counter()
    before = valid_answer(url, features)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(hostile_bodies())
    def fuzz(body) -> None:
        answer = post_raw(url, body)
        statuses[str(answer.status_code)] += 1
        check_answer(answer, body)

    fuzz()
    up = requests.get(f"{url}/ping", timeout=30).status_code == 200
    return {
        "inputs_tried": sum(statuses.values()),
        "statuses": dict(statuses),
        "errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "server_up_afterwards": up,
        "valid_answers_unchanged": valid_answer(url, features) == before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--fuzz", type=int, default=500, help="Hostile bodies to send (0: skip).")
    parser.add_argument("--model", default="minilm", help="Encoder of the served model ('minilm' or a checkpoint dir).")
    parser.add_argument("--k", type=int, default=16, help="Neighbours per row in the served model.")
    parser.add_argument("--out", default=str(RESULTS / "reliability.json"))
    args = parser.parse_args()
    from conftest import build_tabcons_model

    from mlflow_tabcons import flavor
    from mlflow_tabcons.data.tables import load_dataset
    from mlflow_tabcons.members.checkpoints import resolve_model_path

    dataset = load_dataset("diabetes")
    features = dataset.frame[dataset.features]
    model = build_tabcons_model(resolve_model_path(args.model), k=args.k)
    rows = features.to_dict(orient="records")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model"
        flavor.save_model(model, path, input_example=features.head(2))
        with Server(path, Path(folder) / "server.log") as server:
            load = load_test(server.url, rows, clients=args.clients, seconds=args.seconds, server_pid=server.process.pid)
            print({k: v for k, v in asdict(load).items() if k != "rss_samples"})
            described = {"machine": machine(), "model": f"{args.model} encoder, seeded untrained LoRA and head, k={args.k}"}
            update_result("serving_load", {**described, "request": "1 row, dataframe_records", **asdict(load)}, args.out)
            if args.fuzz:
                fuzz = fuzz_test(server.url, features, args.fuzz)
                print(fuzz)
                update_result("serving_fuzz", {**described, **fuzz}, args.out)


if __name__ == "__main__":
    main()
