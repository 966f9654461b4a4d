"""The gated registry store through MLflow's Python client, on a real SQLite file, PostgreSQL and MySQL (MariaDB) database."""

from __future__ import annotations

import getpass
import json
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from conftest import ADMIN_URI_FIXTURES, SQL_BACKENDS, new_database
from gate_support import DIGEST as DIGEST_OF_TEST
from gate_support import KEY, POLICY, VERIFIER_KEY, evidence, new_version
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_tabcons.gate.evidence import EVIDENCE_TAG, FORMAT_VERSION, sign_evidence
from mlflow_tabcons.gate import PolicyError, audit_trail
from mlflow_tabcons.gate.store import GatedRegistryStore

DENIED = "PERMISSION_DENIED"


@pytest.fixture(params=SQL_BACKENDS)
def database_uri(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gate.db'}"
        return
    with new_database(request.getfixturevalue(ADMIN_URI_FIXTURES[request.param])) as uri:
        yield uri


@pytest.fixture()
def policy_file(tmp_path, monkeypatch):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    monkeypatch.setenv("TABCONS_POLICY", str(path))
    monkeypatch.setenv("TABCONS_EVIDENCE_KEY", KEY.decode())
    monkeypatch.setenv("TABCONS_VERIFIER_KEY", VERIFIER_KEY.decode())
    return path


@pytest.fixture()
def client(database_uri: str, policy_file) -> MlflowClient:
    return MlflowClient(tracking_uri=database_uri, registry_uri="tabcons+" + database_uri)


def audit_of(database_uri: str, name: str, action: str | None = None):
    return [r for r in audit_trail("tabcons+" + database_uri, name) if action in (None, r.action)]


def refusal(call, *args) -> str:
    with pytest.raises(MlflowException) as caught:
        call(*args)
    assert caught.value.error_code == DENIED, caught.value.message
    return caught.value.message


def test_alias_allowed_records_verdict_tag_and_audit(client, database_uri):
    version = new_version(client, "credit")
    client.set_registered_model_alias("credit", "champion", version.version)
    assert client.get_registered_model("credit").aliases == {"champion": version.version}
    verdict = client.get_model_version("credit", version.version).tags["tabcons.verdict.champion"]
    assert verdict.startswith("allowed") and "policy's 95% interval): 0.8238 >= 0.8000" in verdict  # 90 of 100 certified
    (row,) = audit_of(database_uri, "credit", "set_alias")
    assert row.allowed and row.actor == f"local:{getpass.getuser()}" and row.target == "alias:champion"
    assert {c["rule"]: round(c["value"], 4) for c in row.detail["checks"]} == {
        "min_certified_fraction": 0.8238, "max_arbitrariness": 0.05, "min_accuracy": 0.8, "max_churn": 0.0,
    }
    assert row.detail["evidence"]["model_sha256"].startswith("sha256:")  # what a later churn check compares with


def test_refusal_lists_every_failed_rule_and_changes_nothing(client, database_uri):
    champion = new_version(client, "credit")
    client.set_registered_model_alias("credit", "champion", champion.version)
    weak = new_version(client, "credit", lower=0.6, arbitrariness=0.2, accuracy=0.5, predictions="1111")
    message = refusal(client.set_registered_model_alias, "credit", "champion", weak.version)
    for fragment in ("0.5482 < 0.8000", "max_arbitrariness: 0.2000 > 0.1000", "min_accuracy: 0.5000 < 0.7000",
                     "max_churn (against version 1): 1.0000 > 0.3000", "tabcons break-glass"):
        assert fragment in message
    assert client.get_registered_model("credit").aliases == {"champion": champion.version}
    assert client.get_model_version("credit", weak.version).tags["tabcons.verdict.champion"].startswith("refused")
    rows = audit_of(database_uri, "credit", "set_alias")
    assert [(r.version, r.allowed) for r in rows] == [(str(champion.version), True), (str(weak.version), False)]


def test_uri_with_a_driver_reaches_the_gate(tmp_path, policy_file):
    """MLflow finds a registry plugin by the URI's whole scheme: ``tabcons+sqlite+pysqlite`` must be gated too."""
    uri = f"sqlite+pysqlite:///{tmp_path / 'gate.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri="tabcons+" + uri)
    weak = new_version(client, "credit", lower=0.6)
    assert "0.5482 < 0.8000" in refusal(client.set_registered_model_alias, "credit", "champion", weak.version)


def test_churn_against_the_incumbent(client):
    client.set_registered_model_alias("credit", "champion", new_version(client, "credit").version)
    close = new_version(client, "credit", predictions="1000")
    client.set_registered_model_alias("credit", "champion", close.version)  # churn 0.25 <= 0.30
    elsewhere = new_version(client, "credit", digest="sha256:" + "cd" * 32)
    assert "another evaluation set" in refusal(client.set_registered_model_alias, "credit", "champion", elsewhere.version)
    assert client.get_registered_model("credit").aliases == {"champion": close.version}


def test_unprotected_alias_and_unsigned_version_pass_untouched(client, database_uri):
    version = new_version(client, "credit", signed=False)
    client.set_registered_model_alias("credit", "dev", version.version)
    assert client.get_registered_model("credit").aliases == {"dev": version.version}
    assert audit_of(database_uri, "credit") == []
    assert "no tabcons.evidence tag" in refusal(client.set_registered_model_alias, "credit", "champion", version.version)


def test_stage_rule_on_the_point_estimate(client):
    passes_on_point = new_version(client, "credit", lower=0.78)  # point 0.83
    client.transition_model_version_stage("credit", passes_on_point.version, "production")
    assert client.get_model_version("credit", passes_on_point.version).current_stage == "Production"
    fails = new_version(client, "credit", lower=0.70)  # point 0.75
    assert "point estimate): 0.7500 < 0.8000" in refusal(client.transition_model_version_stage, "credit", fails.version, "Production")
    assert client.get_model_version("credit", fails.version).current_stage == "None"
    tags = client.get_model_version("credit", fails.version).tags
    assert tags["tabcons.verdict.stage.Production"].startswith("refused")


def test_copy_into_a_new_model_refused_leaves_no_model(client, database_uri):
    weak = new_version(client, "dev-credit", lower=0.6)
    message = refusal(client.copy_model_version, f"models:/dev-credit/{weak.version}", "prod-credit")
    assert "copy from dev-credit" in message
    assert client.search_registered_models("name = 'prod-credit'") == []
    (row,) = audit_of(database_uri, "prod-credit", "copy")
    assert not row.allowed and row.version == str(weak.version)


def test_copy_allowed_carries_evidence_not_verdicts(client):
    strong = new_version(client, "dev-credit")
    client.set_registered_model_alias("dev-credit", "champion", strong.version)
    copied = client.copy_model_version(f"models:/dev-credit/{strong.version}", "prod-credit")
    tags = client.get_model_version("prod-credit", copied.version).tags
    assert EVIDENCE_TAG in tags and not any(k.startswith("tabcons.verdict") for k in tags)
    client.set_registered_model_alias("prod-credit", "champion", copied.version)


def test_version_from_models_source_into_empty_model_removes_it(client):
    weak = new_version(client, "dev-credit", lower=0.6)
    client.create_registered_model("prod-new")  # what mlflow.register_model and REST copies do first
    refusal(client.create_model_version, "prod-new", f"models:/dev-credit/{weak.version}", weak.run_id)
    assert client.search_registered_models("name = 'prod-new'") == []
    client.create_registered_model("prod-kept", description="owned by the risk team")
    refusal(client.create_model_version, "prod-kept", f"models:/dev-credit/{weak.version}", weak.run_id)
    assert client.get_registered_model("prod-kept").description == "owned by the risk team"


@pytest.mark.parametrize("source", ["models:/dev-credit@champion", "models:/dev-credit/latest", "models:/dev-credit/Production"])
def test_a_models_source_must_pin_its_version(client, source):
    """The gate judges the version a moving source names before the copy; MLflow refuses to copy from one at all,
    so the version judged is always the version copied (were that to change, this test says so)."""
    strong = new_version(client, "dev-credit")
    client.set_registered_model_alias("dev-credit", "champion", strong.version)
    client.transition_model_version_stage("dev-credit", strong.version, "Production")
    client.create_registered_model("prod-credit")  # what a REST copy does first
    with pytest.raises(MlflowException, match="Unable to fetch model from model URI"):
        client.create_model_version("prod-credit", source, strong.run_id)
    assert client.search_model_versions("name = 'prod-credit'") == []


@pytest.mark.parametrize("forgery", ["unsigned", "other key", "other run", "garbage"])
def test_hand_set_evidence_is_refused(client, database_uri, forgery):
    version = new_version(client, "credit", lower=0.6)
    original = client.get_model_version("credit", version.version).tags[EVIDENCE_TAG]
    good = evidence(version.run_id, lower=0.95)
    value = {
        "unsigned": json.dumps({"format": FORMAT_VERSION, "evidence": good.to_dict()}),
        "other key": sign_evidence(good, b"someone-elses-key-0123456789"),
        "other run": sign_evidence(evidence("0" * 32, lower=0.95), KEY),
        "garbage": "certified_fraction=1.0",
    }[forgery]
    refusal(client.set_model_version_tag, "credit", version.version, EVIDENCE_TAG, value)
    assert client.get_model_version("credit", version.version).tags[EVIDENCE_TAG] == original
    assert [r.allowed for r in audit_of(database_uri, "credit", "set_evidence")] == [True, False]


def test_gate_tags_cannot_be_written_or_deleted_by_hand(client):
    version = new_version(client, "credit")
    refusal(client.set_model_version_tag, "credit", version.version, "tabcons.verdict.champion", "allowed")
    refusal(client.delete_model_version_tag, "credit", version.version, EVIDENCE_TAG)
    refusal(client.set_registered_model_tag, "credit", "tabcons.evidence", "x")
    refusal(client.create_model_version, "credit", f"runs:/{version.run_id}/model", version.run_id,
            {"tabcons.verdict.champion": "allowed"})
    assert EVIDENCE_TAG in client.get_model_version("credit", version.version).tags


def test_evidence_tampered_in_the_database_is_caught(client, database_uri):
    version = new_version(client, "credit", lower=0.6)
    engine = sa.create_engine(database_uri)
    tags = sa.Table("model_version_tags", sa.MetaData(), autoload_with=engine)  # quotes `key` where it is reserved
    forged = sa.func.replace(tags.c.value, '"certified_fraction_lower": 0.6', '"certified_fraction_lower": 0.9')
    with engine.begin() as connection:
        connection.execute(tags.update().where(tags.c.key == EVIDENCE_TAG).values(value=forged))
    engine.dispose()
    assert '"certified_fraction_lower": 0.9' in client.get_model_version("credit", version.version).tags[EVIDENCE_TAG]
    assert "tampered evidence" in refusal(client.set_registered_model_alias, "credit", "champion", version.version)


def test_rename_cannot_dodge_the_rules(client):
    weak = new_version(client, "sandbox-credit", signed=False)
    client.set_registered_model_alias("sandbox-credit", "champion", weak.version)  # sandboxes are not protected
    message = refusal(client.rename_registered_model, "sandbox-credit", "credit")
    assert "alias @champion for model 'credit'" in message
    assert client.get_registered_model("sandbox-credit").aliases == {"champion": weak.version}
    client.rename_registered_model("sandbox-credit", "sandbox-other")
    assert client.get_registered_model("sandbox-other").aliases == {"champion": weak.version}



def test_rename_is_judged_and_audited_as_the_new_names_promotion(client, database_uri):
    good = new_version(client, "sandbox-credit", lower=0.95)
    client.set_registered_model_alias("sandbox-credit", "champion", good.version)
    client.rename_registered_model("sandbox-credit", "credit")
    assert client.get_registered_model("credit").aliases == {"champion": good.version}
    [record] = audit_of(database_uri, "credit", "rename")
    assert record.allowed and record.target == "alias:champion" and record.version == str(good.version)


def test_a_rename_judges_the_holders_it_renames_not_those_it_read_before_the_lock(client, database_uri):
    """A weak @champion set on the sandbox while the rename waits for the lock must be judged as the new name's."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    weak = new_version(client, "sandbox-credit", signed=False)
    writer, renamer = (GatedRegistryStore("tabcons+" + database_uri) for _ in range(2))  # like two server workers
    locked, outcome = threading.Event(), {}

    def set_champion_under_the_lock() -> None:
        with writer.gate.sessions.transaction(["sandbox-credit"]):
            SqlAlchemyStore.set_registered_model_alias(writer, "sandbox-credit", "champion", weak.version)
            locked.set()
            time.sleep(1.0)  # the rename starts meanwhile and must wait for this transaction

    def rename() -> None:
        locked.wait()
        try:
            renamer.rename_registered_model("sandbox-credit", "credit")
            outcome["rename"] = "allowed"
        except MlflowException as error:
            outcome["rename"] = error.error_code

    threads = [threading.Thread(target=set_champion_under_the_lock), threading.Thread(target=rename)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcome == {"rename": DENIED}
    assert client.get_registered_model("sandbox-credit").aliases == {"champion": int(weak.version)}
    assert [r.target for r in audit_of(database_uri, "credit", "rename")] == ["alias:champion"]


BREAK_GLASS_POLICY = POLICY.replace("version: 1\n", "version: 1\nbreak_glass: {allowed: true, ttl_minutes: 30}\n")


def _as(monkeypatch, user: str) -> None:
    """Act as another OS user: an in-process client is named by its OS user in the audit trail."""
    monkeypatch.setattr(getpass, "getuser", lambda: user)


def test_break_glass_needs_a_second_person_is_audited_and_one_shot(client, database_uri, policy_file, monkeypatch):
    policy_file.write_text(BREAK_GLASS_POLICY)
    weak = new_version(client, "credit", lower=0.6)
    glass = "tabcons.break_glass.champion"
    with pytest.raises(MlflowException, match="justification") as caught:
        client.set_model_version_tag("credit", weak.version, glass, "   ")
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="name the target"):
        client.set_model_version_tag("credit", weak.version, "tabcons.break_glass", "INC-42")
    _as(monkeypatch, "cro-anna")
    client.set_model_version_tag("credit", weak.version, glass, "INC-42: CRO approved")
    assert "cannot also promote" in refusal(client.set_registered_model_alias, "credit", "champion", weak.version)
    assert glass not in client.get_model_version("credit", weak.version).tags  # consumed by the refused attempt
    client.set_model_version_tag("credit", weak.version, glass, "INC-42: CRO approved")
    _as(monkeypatch, "engineer-ben")
    client.set_registered_model_alias("credit", "champion", weak.version)
    tags = client.get_model_version("credit", weak.version).tags
    assert glass not in tags and tags["tabcons.verdict.champion"].startswith("allowed by break-glass")
    armed, used = audit_of(database_uri, "credit")[-2:]
    assert (armed.action, armed.actor, armed.break_glass) == ("arm_break_glass", "local:cro-anna", "INC-42: CRO approved")
    assert (used.action, used.allowed, used.actor, used.break_glass) == ("set_alias", True, "local:engineer-ben", "INC-42: CRO approved")
    client.delete_registered_model_alias("credit", "champion")
    refusal(client.set_registered_model_alias, "credit", "champion", weak.version)


def test_break_glass_is_bound_to_its_target_approvers_and_time(client, policy_file, monkeypatch):
    policy_file.write_text(BREAK_GLASS_POLICY.replace("ttl_minutes: 30", "ttl_minutes: 30, approvers: [cro-anna]"))
    weak = new_version(client, "credit", lower=0.6)
    _as(monkeypatch, "engineer-ben")
    assert "not one of the policy's break-glass approvers" in refusal(
        client.set_model_version_tag, "credit", weak.version, "tabcons.break_glass.champion", "self-approved")
    _as(monkeypatch, "cro-anna")
    client.set_model_version_tag("credit", weak.version, "tabcons.break_glass.stage.Production", "INC-7")
    _as(monkeypatch, "engineer-ben")
    refusal(client.set_registered_model_alias, "credit", "champion", weak.version)  # armed for Production only
    _as(monkeypatch, "cro-anna")
    client.set_model_version_tag("credit", weak.version, "tabcons.break_glass.champion", "INC-8")
    _as(monkeypatch, "engineer-ben")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 31 * 60)
    assert "expired" in refusal(client.set_registered_model_alias, "credit", "champion", weak.version)


def test_break_glass_does_not_cover_missing_evidence_and_is_off_by_default(client, policy_file, monkeypatch):
    unsigned = new_version(client, "credit", signed=False)
    assert "does not allow it" in refusal(client.set_model_version_tag, "credit", unsigned.version,
                                          "tabcons.break_glass.champion", "please")
    policy_file.write_text(BREAK_GLASS_POLICY)
    _as(monkeypatch, "cro-anna")
    client.set_model_version_tag("credit", unsigned.version, "tabcons.break_glass.champion", "INC-9")
    _as(monkeypatch, "engineer-ben")
    message = refusal(client.set_registered_model_alias, "credit", "champion", unsigned.version)
    assert "no tabcons.evidence tag" in message and "does not override missing" in message


def test_policy_broken_later_fails_closed_then_recovers(client, policy_file):
    version = new_version(client, "credit")
    policy_file.write_text(POLICY + "  oops: [\n")
    message = refusal(client.set_registered_model_alias, "credit", "champion", version.version)
    assert "cannot be used" in message and "line" in message
    refusal(client.set_registered_model_alias, "credit", "dev", version.version)
    policy_file.write_text(POLICY)
    client.set_registered_model_alias("credit", "champion", version.version)


def test_store_refuses_to_start_without_a_valid_policy(tmp_path, monkeypatch):
    uri = f"tabcons+sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.delenv("TABCONS_POLICY", raising=False)
    with pytest.raises(PolicyError, match="TABCONS_POLICY"):
        GatedRegistryStore(uri)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\naliases:\n  champion:\n    max_churn: 1.5\n")
    with pytest.raises(PolicyError, match=r"bad.yaml line 4: aliases.champion.max_churn must be a fraction"):
        GatedRegistryStore(uri, policy_path=bad)


def test_concurrent_promotions_serialize(client, database_uri):
    """Four candidates pass against the incumbent but disagree with each other: exactly one may win."""
    incumbent = new_version(client, "credit")
    client.set_registered_model_alias("credit", "champion", incumbent.version)
    strong = [str(new_version(client, "credit", predictions=p).version) for p in ("1000", "0100", "0010", "0001")]
    weak = [str(new_version(client, "credit", lower=0.5).version) for _ in range(4)]
    stores = [GatedRegistryStore("tabcons+" + database_uri) for _ in range(2)]  # like two server workers
    barrier = threading.Barrier(8)
    outcomes: dict[str, str] = {}

    def attempt(index: int, version: str) -> None:
        barrier.wait()
        try:
            stores[index % 2].set_registered_model_alias("credit", "champion", version)
            outcomes[version] = "allowed"
        except MlflowException as error:
            outcomes[version] = error.error_code

    threads = [threading.Thread(target=attempt, args=(i, v)) for i, v in enumerate(strong + weak)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [v for v, outcome in outcomes.items() if outcome == "allowed"]
    assert len(winners) == 1 and winners[0] in strong
    assert {outcomes[v] for v in outcomes if v not in winners} == {DENIED}
    assert client.get_registered_model("credit").aliases == {"champion": int(winners[0])}
    rows = audit_of(database_uri, "credit", "set_alias")[1:]
    assert sorted(r.version for r in rows) == sorted(strong + weak)
    assert [r.version for r in rows if r.allowed] == winners
    later_strong = [r for r in rows if r.version in strong and not r.allowed]
    assert all("max_churn" in r.summary and "0.5000 > 0.3000" in r.summary for r in later_strong)


def test_verified_target_reads_verifier_evidence_and_compares_churn_on_the_holdout(client, policy_file):
    holdout = "sha256:" + "cd" * 32
    policy_file.write_text(POLICY.replace("    max_churn: 0.30\nstages",
                                          f"    max_churn: 0.30\n    protocol: {{evidence: verified, holdout_sha256: '{holdout}'}}\nstages", 1))
    trainer_only = new_version(client, "credit", lower=0.95)
    assert "no tabcons.evidence.verified tag" in refusal(client.set_registered_model_alias, "credit", "champion", trainer_only.version)
    elsewhere = new_version(client, "credit", role="verifier", arbitrariness=None, lower=0.95)
    message = refusal(client.set_registered_model_alias, "credit", "champion", elsewhere.version)
    assert f"protocol breach: holdout {DIGEST_OF_TEST} (policy: the holdout {holdout})" in message
    assert "max_arbitrariness: not measured: the verifier scored one model" in message
    policy_file.write_text(policy_file.read_text().replace("    max_arbitrariness: 0.10\n", "", 1))
    first = new_version(client, "credit", role="verifier", arbitrariness=None, lower=0.95, digest=holdout, predictions="0000")
    client.set_registered_model_alias("credit", "champion", first.version)
    churny = new_version(client, "credit", role="verifier", arbitrariness=None, lower=0.95, digest=holdout, predictions="0011")
    assert "max_churn (against version 3): 0.5000 > 0.3000" in refusal(
        client.set_registered_model_alias, "credit", "champion", churny.version)


def test_break_glass_and_promote_commands(client, database_uri, policy_file, monkeypatch):
    from click.testing import CliRunner

    from mlflow_tabcons.cli import cli

    policy_file.write_text(BREAK_GLASS_POLICY)
    weak = new_version(client, "credit", lower=0.6)
    registry = ["--registry-uri", "tabcons+" + database_uri]
    _as(monkeypatch, "cro-anna")
    armed = CliRunner().invoke(cli, ["break-glass", "credit", str(weak.version), "champion", "--justification", "INC-5"] + registry)
    assert armed.exit_code == 0 and "another identity may now promote it" in armed.output, armed.output
    _as(monkeypatch, "engineer-ben")
    promoted = CliRunner().invoke(cli, ["promote", "credit", str(weak.version), "champion"] + registry)
    assert promoted.exit_code == 0 and "allowed by break-glass" in promoted.output, promoted.output
