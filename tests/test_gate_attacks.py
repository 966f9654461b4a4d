"""Every side door around the promotion gate we could find, tried against a real gated store on SQLite, PostgreSQL and MariaDB.

Each attack tries to get a version that fails the policy (or whose evidence
is not its own, or was measured under the trainer's own rules) to @champion or
the Production stage of the protected model ``credit``. It must be refused,
leave the protected target as it was, and leave a refusal in the audit trail
where the gate audits that path. ``ATTACKS`` is also run by
benchmarks/reliability_gate.py, which counts attempts, refusals and bypasses
for reliability.json.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import ADMIN_URI_FIXTURES, SQL_BACKENDS, new_database
from gate_support import KEY, POLICY, VERIFIER_KEY, evidence, model_files, new_version
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

from mlflow_tabcons.gate import audit, audit_trail
from mlflow_tabcons.gate.artifacts import directory_digest
from mlflow_tabcons.gate.binding import attach_evidence
from mlflow_tabcons.gate.evidence import (
    BREAK_GLASS_TAG,
    EVIDENCE_TAG,
    FORMAT_VERSION,
    VERIFIED_EVIDENCE_TAG,
    Evidence,
    sign_evidence,
)

MODEL = "credit"


@dataclass
class Arena:
    """A fresh gated store on SQLite, its policy file, and a client going through the gate."""

    client: MlflowClient
    uri: str
    policy: Path
    target: str | None = None  # the version the attack tries to promote in MODEL

    def aim(self, version):
        self.target = str(version.version)
        return version

    def refusals(self) -> int:
        return sum(not record.allowed for record in audit_trail("tabcons+" + self.uri))

    def champion(self) -> str | None:
        """Read from the database (MLflow hides models tagged as prompts), in any spelling of the alias."""
        engine = sa.create_engine(self.uri)
        try:
            with engine.connect() as connection:
                row = connection.execute(
                    sa.text("select version from registered_model_aliases "
                            "where lower(name) = :name and lower(alias) = 'champion'"),
                    {"name": MODEL},
                ).first()
        finally:
            engine.dispose()
        return None if row is None else str(row[0])

    def production(self) -> list[str]:
        """Every version in Production, not only the newest (``get_latest_versions`` shows one per stage)."""
        return [v.version for v in self.client.search_model_versions(f"name='{MODEL}'") if v.current_stage == "Production"]

    def allow_break_glass(self) -> None:
        self.policy.write_text(POLICY.replace("version: 1\n", "version: 1\nbreak_glass: {allowed: true}\n"))


def _weak(arena: Arena, **fields: object):
    return arena.aim(new_version(arena.client, MODEL, lower=0.5, accuracy=0.5, arbitrariness=0.4, **fields))


def forged_unsigned_evidence(arena: Arena) -> None:
    weak = _weak(arena)
    payload = json.dumps({"format": FORMAT_VERSION, "evidence": evidence(weak.run_id, lower=0.99).to_dict()})
    arena.client.set_model_version_tag(MODEL, weak.version, EVIDENCE_TAG, payload)


def forged_evidence_own_key(arena: Arena) -> None:
    weak = _weak(arena)
    forged = sign_evidence(evidence(weak.run_id, lower=0.99), b"attacker-key-0123456789abcdef0123")
    arena.client.set_model_version_tag(MODEL, weak.version, EVIDENCE_TAG, forged)


def evidence_of_another_run_at_creation(arena: Arena) -> None:
    good = new_version(arena.client, "other-model", lower=0.99)
    stolen = arena.client.get_model_version("other-model", good.version).tags[EVIDENCE_TAG]
    run_id = arena.client.create_run("0").info.run_id
    arena.client.create_registered_model(MODEL)
    arena.target = "1"
    arena.client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id, tags={EVIDENCE_TAG: stolen})


def hand_set_verdict_tag(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_model_version_tag(MODEL, weak.version, "tabcons.verdict.champion", "allowed")


def evidence_tag_deleted(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.delete_model_version_tag(MODEL, weak.version, EVIDENCE_TAG)


def alias_direct(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def alias_with_padded_version(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_registered_model_alias(MODEL, "champion", f"0{weak.version}")


def alias_on_unsigned_version(arena: Arena) -> None:
    weak = arena.aim(new_version(arena.client, MODEL, signed=False))
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def alias_after_tagging_the_model_a_prompt(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_registered_model_tag(MODEL, "mlflow.prompt.is_prompt", "true")
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def stage_transition_any_case(arena: Arena) -> None:
    weak = _weak(arena)
    for stage in ("production", "PRODUCTION", "Production"):
        try:
            arena.client.transition_model_version_stage(MODEL, weak.version, stage)
        except MlflowException as error:
            if error.error_code != "PERMISSION_DENIED":
                raise
    if weak.version not in arena.production():
        raise MlflowException("tabcons gate refused every spelling", error_code=PERMISSION_DENIED)


def copy_weak_into_protected(arena: Arena) -> None:
    weak = new_version(arena.client, "dev-credit", lower=0.5)
    arena.target = "1"
    arena.client.copy_model_version(f"models:/dev-credit/{weak.version}", MODEL)


def models_source_into_protected(arena: Arena) -> None:
    weak = new_version(arena.client, "dev-credit", lower=0.5)
    arena.client.create_registered_model(MODEL)
    arena.target = "1"
    arena.client.create_model_version(MODEL, f"models:/dev-credit/{weak.version}", weak.run_id)


def rename_sandbox_champion_into_protected(arena: Arena) -> None:
    weak = new_version(arena.client, "sandbox-credit", signed=False)
    arena.client.set_registered_model_alias("sandbox-credit", "champion", weak.version)
    arena.target = weak.version
    arena.client.rename_registered_model("sandbox-credit", MODEL)


def delete_and_recreate(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95)
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    arena.client.delete_registered_model(MODEL)
    weak = _weak(arena)  # version 1 again, in a model of the same name
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def break_glass_without_justification(arena: Arena) -> None:
    weak = _weak(arena)
    try:
        arena.client.set_model_version_tag(MODEL, weak.version, BREAK_GLASS_TAG, "  ")
    except MlflowException:
        pass
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def _policy_made_unusable(how: Callable[[Path], None]) -> Callable[[Arena], None]:
    def attack(arena: Arena) -> None:
        good = new_version(arena.client, MODEL, lower=0.95)  # passes the policy while it is readable
        how(arena.policy)
        arena.aim(good)
        arena.client.set_registered_model_alias(MODEL, "champion", good.version)

    return attack


def _removed(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("gone.yaml"))


def _unreadable(path: Path) -> None:
    path.chmod(0)


def _emptied(path: Path) -> None:
    path.write_text("")


def evidence_replayed_on_another_artifact(arena: Arena) -> None:
    """Genuine evidence, copied onto a new version of the same run whose source is any other model."""
    good = new_version(arena.client, MODEL, lower=0.95)
    genuine = arena.client.get_model_version(MODEL, good.version).tags[EVIDENCE_TAG]
    other = arena.aim(arena.client.create_model_version(MODEL, "file:///somewhere/else/model", good.run_id,
                                                        tags={EVIDENCE_TAG: genuine}))
    arena.client.set_registered_model_alias(MODEL, "champion", other.version)


def churn_dodged_by_removing_the_alias_first(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95, predictions="0000")
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    churny = arena.aim(new_version(arena.client, MODEL, lower=0.95, predictions="1111"))  # churn 1.0 > max_churn 0.3
    arena.client.delete_registered_model_alias(MODEL, "champion")
    arena.client.set_registered_model_alias(MODEL, "champion", churny.version)


def the_issues_cheat(arena: Arena) -> None:
    """`tabcons train ... --tau -0.9 --alpha 0.5 --k 16`, members at the majority rate: everything certified."""
    cheat = arena.aim(new_version(arena.client, MODEL, lower=0.95, tau=-0.9, alpha=0.5, k=16, members_learned=False))
    arena.client.set_registered_model_alias(MODEL, "champion", cheat.version)


def stated_variance_bound_below_the_rows(arena: Arena) -> None:
    """`--bound bernstein --variance-bound 1e-9`: certifies rows the empirical Bernstein bound does not."""
    cheat = arena.aim(new_version(arena.client, MODEL, lower=0.95, bound="bernstein", variance_bound=1e-9,
                                  max_row_variance=0.2))
    arena.client.set_registered_model_alias(MODEL, "champion", cheat.version)


def vanishing_sigma(arena: Arena) -> None:
    """Neighbours at radius 1e-6 are the row itself: every row is 'consistent'."""
    cheat = arena.aim(new_version(arena.client, MODEL, lower=0.95, sigma=1e-6))
    arena.client.set_registered_model_alias(MODEL, "champion", cheat.version)


def weights_changed_after_registration(arena: Arena) -> None:
    """Good evidence, then one byte appended to the stored model.safetensors."""
    good = arena.aim(new_version(arena.client, MODEL, lower=0.95))
    location = arena.client.get_model_version_download_uri(MODEL, good.version)
    with open(os.path.join(location, "model.safetensors"), "ab") as weights:
        weights.write(b"\0")
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)


def churn_dodged_by_deleting_the_holder(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95, predictions="0000")
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    churny = arena.aim(new_version(arena.client, MODEL, lower=0.95, predictions="1111"))
    arena.client.delete_model_version(MODEL, good.version)
    arena.client.set_registered_model_alias(MODEL, "champion", churny.version)


def churn_dodged_by_deleting_the_model(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95, predictions="0000")
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    arena.client.delete_registered_model(MODEL)
    churny = arena.aim(new_version(arena.client, MODEL, lower=0.95, predictions="1111"))  # version 1 again
    arena.client.set_registered_model_alias(MODEL, "champion", churny.version)


def churn_dodged_by_archiving_the_stage_holder(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95, predictions="0000")
    arena.client.transition_model_version_stage(MODEL, good.version, "Production")
    churny = arena.aim(new_version(arena.client, MODEL, lower=0.95, predictions="1111"))
    arena.client.transition_model_version_stage(MODEL, good.version, "Archived")
    arena.client.transition_model_version_stage(MODEL, churny.version, "Production")


def break_glass_armed_by_the_promoter(arena: Arena) -> None:
    arena.allow_break_glass()
    weak = _weak(arena)
    arena.client.set_model_version_tag(MODEL, weak.version, f"{BREAK_GLASS_TAG}.champion", "I approve myself")
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def break_glass_armed_in_process_and_promoted_over_rest_by_one_person(arena: Arena) -> None:
    """Anna arms break-glass from a Python shell (named local:anna) and promotes as the REST user Anna."""
    arena.allow_break_glass()
    weak = _weak(arena)
    _armed_by_an_approver(arena, weak.version, "champion", os_user="anna")
    real_actor = audit.current_actor
    audit.current_actor = lambda: "Anna"  # what the auth app names her over REST
    try:
        arena.client.set_registered_model_alias(MODEL, "champion", weak.version)
    finally:
        audit.current_actor = real_actor


def _armed_by_an_approver(arena: Arena, version: str, suffix: str, os_user: str = "approver-anna") -> None:
    """Arm break-glass as another OS user (an in-process client is named by its OS user)."""
    real = getpass.getuser
    getpass.getuser = lambda: os_user
    try:
        arena.client.set_model_version_tag(MODEL, version, f"{BREAK_GLASS_TAG}.{suffix}", "INC-1: approved")
    finally:
        getpass.getuser = real


def break_glass_armed_for_another_target(arena: Arena) -> None:
    arena.allow_break_glass()
    weak = _weak(arena)
    _armed_by_an_approver(arena, weak.version, "stage.Staging")
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def break_glass_over_untrusted_evidence(arena: Arena) -> None:
    arena.allow_break_glass()
    unsigned = arena.aim(new_version(arena.client, MODEL, signed=False))
    _armed_by_an_approver(arena, unsigned.version, "champion")
    arena.client.set_registered_model_alias(MODEL, "champion", unsigned.version)


def alias_in_upper_case(arena: Arena) -> None:
    """On MySQL/MariaDB `CHAMPION` is the row `champion`; everywhere, the gate treats it as protected."""
    weak = _weak(arena)
    arena.client.set_registered_model_alias(MODEL, "CHAMPION", weak.version)


def trainer_evidence_under_verified(arena: Arena) -> None:
    arena.policy.write_text(POLICY.replace("    max_churn: 0.30\nstages", "    max_churn: 0.30\n    protocol: {evidence: verified}\nstages", 1))
    good = arena.aim(new_version(arena.client, MODEL, lower=0.95))
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)


def trainer_key_in_the_verified_tag(arena: Arena) -> None:
    arena.policy.write_text(POLICY.replace("    max_churn: 0.30\nstages", "    max_churn: 0.30\n    protocol: {evidence: verified}\nstages", 1))
    good = arena.aim(new_version(arena.client, MODEL, lower=0.95))
    trainer = arena.client.get_model_version(MODEL, good.version).tags[EVIDENCE_TAG]
    posing = Evidence.from_dict({**json.loads(trainer)["evidence"], "role": "verifier"})
    forged = sign_evidence(posing, KEY)
    arena.client.set_model_version_tag(MODEL, good.version, VERIFIED_EVIDENCE_TAG, forged)


def verifier_key_set_to_the_trainer_key(arena: Arena) -> None:
    """The registry's verifier key misconfigured as the trainer's: the trainer signs its own "verified" evidence."""
    os.environ["TABCONS_VERIFIER_KEY"] = KEY.decode()  # the arena's monkeypatch restores it
    trainer_key_in_the_verified_tag(arena)
    arena.client.set_registered_model_alias(MODEL, "champion", arena.target)


def churn_dodged_by_renaming_a_sandbox_in(arena: Arena) -> None:
    """Delete the model behind the holder, put a churny version at a sandbox's @champion, rename the sandbox to it."""
    good = new_version(arena.client, MODEL, lower=0.95, predictions="0000")
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    arena.client.delete_registered_model(MODEL)
    churny = arena.aim(new_version(arena.client, "sandbox-credit", lower=0.95, predictions="1111"))
    arena.client.set_registered_model_alias("sandbox-credit", "champion", churny.version)
    arena.client.rename_registered_model("sandbox-credit", MODEL)


def protocol_dodged_by_renaming(arena: Arena) -> None:
    """Evidence at k 128 meets the default protocol, not the one the policy pins for the protected model."""
    arena.policy.write_text(POLICY + '  "credit":\n    protocol: {min_k: 256}\n')
    measured = arena.aim(new_version(arena.client, "dev-credit", lower=0.95))
    arena.client.set_registered_model_alias("dev-credit", "champion", measured.version)
    arena.client.rename_registered_model("dev-credit", MODEL)


def weak_production_holder_behind_a_newer_one(arena: Arena) -> None:
    """Two versions in a sandbox's Production: only the newest was judged when the sandbox was renamed."""
    arena.policy.write_text(POLICY + "    stages:\n      Production: {min_certified_fraction: null, max_churn: null}\n")
    weak = arena.aim(new_version(arena.client, "sandbox-credit", lower=0.5))
    good = new_version(arena.client, "sandbox-credit", lower=0.95)
    for version in (weak, good):
        arena.client.transition_model_version_stage("sandbox-credit", version.version, "Production")
    arena.client.rename_registered_model("sandbox-credit", MODEL)


def weights_behind_a_linked_directory(arena: Arena) -> None:
    """The weights sit in a directory the model folder links to, and are rewritten after the evidence is signed."""
    outside, folder = model_files(), model_files()
    digest = directory_digest(folder)  # what the files outside the link leave to hash
    (folder / "weights").symlink_to(outside, target_is_directory=True)
    run_id = arena.client.create_run("0").info.run_id
    arena.client.create_registered_model(MODEL)
    version = arena.aim(arena.client.create_model_version(MODEL, str(folder), run_id))
    attach_evidence(arena.client, MODEL, version.version, evidence(run_id, lower=0.95, model_sha256=digest), key=KEY)
    with open(outside / "model.safetensors", "ab") as weights:
        weights.write(b"\0")
    arena.client.set_registered_model_alias(MODEL, "champion", version.version)


def verifier_evidence_hidden_by_a_case_variant_key(arena: Arena) -> None:
    """The verifier found the version short; the trainer writes the verifier's tag key in upper case, which on
    MySQL and MariaDB (keys compare case-insensitively) renames the verifier's row, so only the trainer's evidence is left."""
    version = arena.aim(new_version(arena.client, MODEL, lower=0.95))
    content = json.loads(arena.client.get_model_version(MODEL, version.version).tags[EVIDENCE_TAG])["evidence"]["model_sha256"]
    verified = evidence(version.run_id, lower=0.5, role="verifier", model_sha256=content)
    attach_evidence(arena.client, MODEL, version.version, verified, key=VERIFIER_KEY)
    arena.client.set_model_version_tag(MODEL, version.version, VERIFIED_EVIDENCE_TAG.upper(), "gone")
    arena.client.set_registered_model_alias(MODEL, "champion", version.version)


# attack -> whether its refusal must be in the audit trail (hand-written reserved tags are refused before any audit)
ATTACKS: dict[str, tuple[Callable[[Arena], None], bool]] = {
    "forged unsigned evidence": (forged_unsigned_evidence, True),
    "evidence signed with an attacker's key": (forged_evidence_own_key, True),
    "another run's evidence in create_model_version tags": (evidence_of_another_run_at_creation, False),
    "hand-set verdict tag": (hand_set_verdict_tag, False),
    "evidence tag deleted": (evidence_tag_deleted, False),
    "alias set directly": (alias_direct, True),
    "alias with version '0N'": (alias_with_padded_version, True),
    "alias on an unsigned version": (alias_on_unsigned_version, True),
    # MLflow itself then treats the model as a prompt and no longer finds it: refused before the gate is asked
    "alias after tagging the model as a prompt": (alias_after_tagging_the_model_a_prompt, False),
    "stage transition, any spelling of Production": (stage_transition_any_case, True),
    "copy_model_version into the protected model": (copy_weak_into_protected, True),
    "create_model_version with a models:/ source": (models_source_into_protected, True),
    "rename a sandbox holding @champion": (rename_sandbox_champion_into_protected, True),
    "delete the model and recreate it": (delete_and_recreate, True),
    "break-glass without justification": (break_glass_without_justification, True),
    "policy file removed": (_policy_made_unusable(_removed), True),
    "policy path replaced by a directory": (_policy_made_unusable(_directory), True),
    "policy path a dangling symlink": (_policy_made_unusable(_dangling_link), True),
    "policy file emptied": (_policy_made_unusable(_emptied), True),
    # evidence names the model it was measured on: the replay is refused when the version is created
    "evidence replayed onto another artifact of the same run": (evidence_replayed_on_another_artifact, False),
    "churn rule dodged by deleting the alias first": (churn_dodged_by_removing_the_alias_first, True),
    "the issue's cheat: tau -0.9, alpha 0.5, k 16, members that did not learn": (the_issues_cheat, True),
    "classical Bernstein with a variance bound below the rows' variance": (stated_variance_bound_below_the_rows, True),
    "sigma 1e-6 (neighbours are the row itself)": (vanishing_sigma, True),
    "a byte appended to model.safetensors after registration": (weights_changed_after_registration, True),
    "churn rule dodged by deleting the holding version": (churn_dodged_by_deleting_the_holder, True),
    "churn rule dodged by deleting and recreating the model": (churn_dodged_by_deleting_the_model, True),
    "churn rule dodged by archiving the stage holder": (churn_dodged_by_archiving_the_stage_holder, True),
    "break-glass armed by the promoter (self-approval)": (break_glass_armed_by_the_promoter, True),
    "break-glass armed in process and promoted over REST by the same person":
        (break_glass_armed_in_process_and_promoted_over_rest_by_one_person, True),
    "break-glass armed for another target": (break_glass_armed_for_another_target, True),
    "break-glass over missing evidence": (break_glass_over_untrusted_evidence, True),
    "alias spelled CHAMPION": (alias_in_upper_case, True),
    "trainer evidence where the policy asks for verified": (trainer_evidence_under_verified, True),
    "trainer-signed evidence written as the verifier's": (trainer_key_in_the_verified_tag, True),
    "verified evidence signed with a verifier key set to the trainer's": (verifier_key_set_to_the_trainer_key, True),
    "churn rule dodged by renaming a sandbox into the deleted model's name": (churn_dodged_by_renaming_a_sandbox_in, True),
    "the protected model's protocol dodged by a rename": (protocol_dodged_by_renaming, True),
    "a weak Production holder behind a newer one, renamed in": (weak_production_holder_behind_a_newer_one, True),
    # the linked directory is refused when the evidence is attached, before any promotion
    "weights behind a linked directory rewritten after signing": (weights_behind_a_linked_directory, False),
    # a gate tag in any spelling is the gate's: refused before any audit
    "the verifier's evidence hidden behind its tag key in upper case": (verifier_evidence_hidden_by_a_case_variant_key, False),
}
if os.geteuid() != 0:  # root reads a mode-000 file anyway
    ATTACKS["policy file mode 000"] = (_policy_made_unusable(_unreadable), True)


@dataclass
class Outcome:
    refused: bool
    promoted: bool
    audited: bool
    message: str


GATE_TABLES = ("model_version_tags", "registered_model_aliases", "model_versions", "registered_model_tags",
               "registered_models", "tabcons_audit", "tabcons_locks")


def new_arena(folder: Path, database: str | None = None) -> Arena:
    """A gated client on ``database`` (a fresh SQLite file in ``folder`` when None), its registry emptied.

    Needs TABCONS_POLICY and the keys pointing at ``folder`` (see ``gate_environment``).
    """
    uri = database or f"sqlite:///{folder / 'gate.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri="tabcons+" + uri)
    client.search_registered_models()  # creates and migrates the tables, the gate's included
    engine = sa.create_engine(uri)
    try:
        with engine.begin() as connection:
            for table in GATE_TABLES:
                connection.execute(sa.text(f"delete from {table}"))
    finally:
        engine.dispose()
    return Arena(client, uri, folder / "policy.yaml")


def gate_environment(folder: Path) -> dict[str, str]:
    """The policy file written afresh (whatever an earlier attack left at its path) and the keys."""
    path = folder / "policy.yaml"
    if path.is_symlink() or path.is_file():
        path.chmod(0o600) if not path.is_symlink() else None
        path.unlink()
    elif path.is_dir():
        path.rmdir()
    path.write_text(POLICY)
    return {"TABCONS_POLICY": str(folder / "policy.yaml"), "TABCONS_EVIDENCE_KEY": KEY.decode(),
            "TABCONS_VERIFIER_KEY": VERIFIER_KEY.decode()}


def run_attack(arena: Arena, attack: Callable[[Arena], None]) -> Outcome:
    before = arena.refusals()
    try:
        attack(arena)
        refused, message = False, ""
    except MlflowException as error:  # refused, by the gate (PERMISSION_DENIED) or by MLflow itself
        refused, message = True, f"{error.error_code}: {error.message}"
    promoted = arena.target is not None and (arena.champion() == arena.target or arena.target in arena.production())
    return Outcome(refused, promoted, arena.refusals() > before, message)


@pytest.fixture(scope="module", params=SQL_BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One database per backend for the module, and the folder of its policy file (MLflow caches the store per URI)."""
    folder = tmp_path_factory.mktemp("gate-attacks")
    if request.param == "sqlite":
        yield f"sqlite:///{folder / 'gate.db'}", folder
        return
    with new_database(request.getfixturevalue(ADMIN_URI_FIXTURES[request.param])) as uri:
        yield uri, folder


@pytest.fixture()
def arena(monkeypatch, database) -> Arena:
    uri, folder = database
    for key, value in gate_environment(folder).items():
        monkeypatch.setenv(key, value)
    return new_arena(folder, uri)


@pytest.mark.parametrize("name", [pytest.param(name, id=name.replace(" ", "-")) for name in ATTACKS])
def test_attack_is_refused_changes_nothing_and_is_audited(arena, name):
    attack, audited = ATTACKS[name]
    outcome = run_attack(arena, attack)
    assert outcome.refused and not outcome.promoted, f"bypass: {name}"
    if audited:
        assert outcome.audited, f"refused but not audited: {name}"
