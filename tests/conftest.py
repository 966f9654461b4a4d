"""Shared fixtures: a tiny real BERT checkpoint, isolated MLflow stores, real databases.

Services (PostgreSQL, Java for Spark) may be absent on a user's machine: tests
that need one skip with the reason. CI sets TABCONS_REQUIRE_SERVICES=1, which
turns those skips into failures so nothing silently stops being tested.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSTGRES_ADMIN_URI = os.environ.get("TABCONS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URI = os.environ.get("TABCONS_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
# The SQL backends a registry test runs on, and the fixture that reaches each database server
SQL_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)]
ADMIN_URI_FIXTURES = {"postgresql": "postgres_admin_uri", "mysql": "mysql_admin_uri"}


def require_service(reason: str) -> None:
    """Skip, or fail in CI, when a service a test needs is missing."""
    if os.environ.get("TABCONS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"CI requires this service: {reason}")
    pytest.skip(reason)


def build_tiny_checkpoint(path: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised BERT with the real MiniLM tokenizer, saved as a local checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mlflow_tabcons.members.checkpoints import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"), layers=4))


@pytest.fixture()
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking + registry store and artifact root for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.set_experiment(f"test-{uuid.uuid4().hex[:8]}")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    forget_mlflow_uris()
    del experiment


def register_in_sqlite(root: Path, name: str, tabcons_model, input_example) -> str:
    """A SQLite tracking + registry store under ``root`` holding the model as ``name`` version 1; returns its URI."""
    from mlflow_tabcons import flavor

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment(name, artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        flavor.log_model(tabcons_model, "model", input_example=input_example, registered_model_name=name)
    return uri


def forget_mlflow_uris() -> None:
    """Undo set_tracking_uri / set_registry_uri / set_experiment, with the variables they export.

    MLflow exports MLFLOW_REGISTRY_URI and MLFLOW_EXPERIMENT_ID for subprocesses and
    set_registry_uri(None) leaves the first behind, so a later test's subprocess
    would register into this test's (deleted) database.
    """
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(name, None)


def _reachable_admin_uri(uri: str, what: str) -> str:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    try:
        engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as error:  # no driver, no server, refused
        require_service(f"{what} not reachable at {uri}: {type(error).__name__}: {error}")
    return uri


@pytest.fixture(scope="session")
def postgres_admin_uri() -> str:
    return _reachable_admin_uri(POSTGRES_ADMIN_URI, "PostgreSQL")


@pytest.fixture(scope="session")
def mysql_admin_uri() -> str:
    return _reachable_admin_uri(MYSQL_ADMIN_URI, "MySQL/MariaDB")


@contextlib.contextmanager
def new_database(admin_uri: str) -> Iterator[str]:
    """A new, empty PostgreSQL or MySQL database, dropped on exit (for fixtures of any scope)."""
    import sqlalchemy

    name = f"tabcons_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(admin_uri, isolation_level="AUTOCOMMIT")
    quoted = engine.dialect.identifier_preparer.quote_identifier(name)
    force = " with (force)" if engine.dialect.name == "postgresql" else ""
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"create database {quoted}"))
    try:
        yield admin_uri.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"drop database if exists {quoted}{force}"))
        engine.dispose()


@pytest.fixture()
def postgres_uri(postgres_admin_uri: str) -> str:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    with new_database(postgres_admin_uri) as uri:
        yield uri


def pick_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def free_port() -> int:
    return pick_free_port()


@contextlib.contextmanager
def running_server(command: list[str], *, env: dict[str, str], ready_url: str, log_path: Path,
                   startup_seconds: float = 240) -> Iterator[None]:
    """Run a server subprocess in its own session until the block ends; fail with its log if it never gets ready."""
    import signal
    import subprocess
    import time

    import requests

    with open(log_path, "w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def fail(why: str) -> None:
            log.seek(0)
            pytest.fail(f"{' '.join(command[:4])} {why}:\n{log.read()[-3000:]}")

        deadline = time.monotonic() + startup_seconds
        try:
            while True:
                if process.poll() is not None:
                    fail(f"exited with {process.returncode}")
                try:
                    if requests.get(ready_url, timeout=5).status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting up
                    pass
                if time.monotonic() > deadline:
                    fail(f"did not answer {ready_url} within {startup_seconds}s")
                time.sleep(1)
            yield
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def build_tabcons_model(model_dir: str, *, seed: int = 0, k: int = 16):
    """A packaged diabetes classifier of any family (seeded LoRA and head, not trained): enough to test the flavor fast."""
    from mlflow_tabcons.scoring.consistency import ScorerSettings
    from mlflow_tabcons.data.tables import load_dataset
    from mlflow_tabcons.flavor import TabconsModel
    from mlflow_tabcons.members.classifier import (
        ANSWER_CUE, ClassifierSpec, LoraSettings, answer_token_ids, build_classifier, load_base_model, load_tokenizer,
    )
    from mlflow_tabcons.data.serialize import RowSerializer

    dataset = load_dataset("diabetes")
    base = load_base_model(model_dir)
    tokenizer = load_tokenizer(model_dir, base.family)
    generative = base.family != "encoder"
    answer_ids = answer_token_ids(tokenizer, dataset.label_words) if generative else None
    classifier = build_classifier(base, len(dataset.labels), lora=LoraSettings(), seed=seed, answer_ids=answer_ids).eval()
    return TabconsModel(
        classifier=classifier,
        spec=ClassifierSpec(len(dataset.labels), base_model=model_dir),
        tokenizer=tokenizer,
        serializer=RowSerializer(dataset.features, dataset.dictionary, dataset.question, answer_cue=ANSWER_CUE if generative else None),
        labels=dataset.labels,
        settings=ScorerSettings(k=k),
        max_length=128,
        required=list(dataset.features),
    )


def randomize_adapters(model, std: float = 0.2):
    """The packaged model with non-trivial LoRA adapters (their B matrices start at zero), so that merging them matters."""
    with torch.no_grad():
        for name, parameter in model.classifier.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, str]:
    """Tiny random checkpoints of every family: llama, qwen2, gpt2 (decoders), t5, bert."""
    from tiny_models import TINY_KINDS, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-families")
    return {kind: str(build_tiny_checkpoint(kind, root / kind, tiny_tokenizer_dir)) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def tabcons_model(tiny_model_dir: str):
    return build_tabcons_model(tiny_model_dir)


@pytest.fixture(scope="session")
def diabetes_features():
    from mlflow_tabcons.data.tables import load_dataset

    dataset = load_dataset("diabetes")
    return dataset.frame[dataset.features]
