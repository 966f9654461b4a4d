"""Serving latency: a real `mlflow models serve` answering 1-row and 100-row requests at k=128.

A LoRA-fine-tuned MiniLM member (the one bench_scoring.py scores) is packaged
with the tabcons flavor, served on 127.0.0.1 by `mlflow models serve
--env-manager local`, and sent bounded requests of distinct test rows with
the inference param k=128, scoring in the precision the model was saved with
(``--precision``; bfloat16 is the fast path on CPUs with bfloat16 units).
Latency is client-side wall time per request (HTTP, JSON, serialization,
tokenization, the k neighbour passes, the bound); p50 and p95 over the
requests of each size.

    python benchmarks/bench_serving.py [--quick] [--precision P] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, trained_member, write_result  # noqa: E402

from mlflow_tabcons import flavor  # noqa: E402
from mlflow_tabcons.scoring.consistency import PRECISIONS, ScorerSettings  # noqa: E402
from mlflow_tabcons.data.tables import load_dataset  # noqa: E402
from mlflow_tabcons.members.classifier import ClassifierSpec  # noqa: E402

STARTUP_SECONDS = 300
REQUEST_SECONDS = 1800


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def package(directory: Path, classifier, tokenizer, serializer, dataset, settings: ScorerSettings) -> Path:
    model = flavor.TabconsModel(
        classifier=classifier,
        spec=ClassifierSpec(len(dataset.labels)),
        tokenizer=tokenizer,
        serializer=serializer,
        labels=dataset.labels,
        settings=settings,
    )
    path = directory / "model"
    flavor.save_model(model, path, input_example=dataset.frame[dataset.features].head(2))
    return path


class Server:
    """`mlflow models serve` in its own process group, stopped on exit."""

    def __init__(self, model_path: Path, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        # `uvicorn` comes from PATH: the one next to this Python; the server's own 60 s request limit is raised
        env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
               "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(REQUEST_SECONDS)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_path), "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {self.process.returncode}:\n{self._tail()}")
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping in {STARTUP_SECONDS}s:\n{self._tail()}")
            time.sleep(1)

    def _tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def __exit__(self, *_) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()

    def seconds(self, frame, k: int) -> float:
        """Wall time of one answered request; a refusal or a short answer is an error, not a timing."""
        body = {"dataframe_split": frame.to_dict(orient="split", index=False), "params": {"k": k}}
        start = time.perf_counter()
        response = requests.post(f"{self.url}/invocations", json=body, timeout=REQUEST_SECONDS)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"request refused ({response.status_code}): {response.text[:500]}")
        answers = response.json()["predictions"]
        if len(answers) != len(frame) or any(a["consistency_lcb"] is None for a in answers):
            raise RuntimeError(f"{len(frame)} rows sent, {len(answers)} scored answers back")
        return elapsed


def latency(values: list[float]) -> dict[str, float | int]:
    return {"requests": len(values), "p50_s": float(np.percentile(values, 50)), "p95_s": float(np.percentile(values, 95)),
            "mean_s": float(np.mean(values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke-test configuration")
    parser.add_argument("--data", default="diabetes")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--member-cache", help="reuse a member trained earlier with the same settings (see common.py)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help="the served model's scorer precision")
    parser.add_argument("--out", default=str(RESULTS / "serving.json"))
    parser.add_argument("--single-requests", type=int, help="how many 1-row requests (default 20, quick 4)")
    parser.add_argument("--batch-requests", type=int, help="how many 100-row requests (default 5, quick 2)")
    args = parser.parse_args()
    shots, epochs, single_requests, batch_requests, batch_rows = (32, 1, 4, 2, 10) if args.quick else (256, 8, 20, 5, 100)
    single_requests, batch_requests = args.single_requests or single_requests, args.batch_requests or batch_requests

    dataset = load_dataset(args.data)
    classifier, tokenizer, serializer, _ = trained_member(dataset, shots, epochs, "cpu", args.member_cache)
    settings = ScorerSettings(k=args.k, bound="betting", early_stop=True, precision=args.precision)
    # latency needs distinct rows, not held-out ones: the test split of a small table is too short
    pool = dataset.frame[dataset.features].sample(frac=1.0, random_state=2).reset_index(drop=True)
    if len(pool) < single_requests + batch_requests * batch_rows + 1:
        raise SystemExit(f"{args.data} has {len(pool)} rows, too few for {batch_requests} requests of {batch_rows}")
    with tempfile.TemporaryDirectory() as root:
        model_path = package(Path(root), classifier, tokenizer, serializer, dataset, settings)
        with Server(model_path, Path(root) / "server.log") as server:
            server.seconds(pool.iloc[-1:], args.k)  # warm-up: first-request imports and allocations
            single = [server.seconds(pool.iloc[i : i + 1], args.k) for i in range(single_requests)]
            start = single_requests
            batch = [server.seconds(pool.iloc[start + j * batch_rows : start + (j + 1) * batch_rows], args.k)
                     for j in range(batch_requests)]
    result = {
        "benchmark": "serving latency",
        "machine": machine(),
        "config": {"data": args.data, "model": "minilm (LoRA fine-tuned and merged, 1 member)", "shots": shots, "epochs": epochs,
                   "server": "mlflow models serve --env-manager local (1 worker)", "k": args.k,
                   "scorer": settings.to_dict(), "torch_threads_client": torch.get_num_threads()},
        "one_row": latency(single),
        f"{batch_rows}_rows": latency(batch),
        "seconds_one_row": single,
        f"seconds_{batch_rows}_rows": batch,
    }
    path = write_result(result, args.out)
    print(f"1 row p50 {result['one_row']['p50_s']:.2f}s p95 {result['one_row']['p95_s']:.2f}s | "
          f"{batch_rows} rows p50 {result[f'{batch_rows}_rows']['p50_s']:.2f}s p95 {result[f'{batch_rows}_rows']['p95_s']:.2f}s -> {path}")


if __name__ == "__main__":
    main()
