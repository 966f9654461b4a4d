"""Signed evidence: round trip, tampering, roles and keys, old formats, the evaluation-set digest, content digests."""

from __future__ import annotations

import json
import stat

import pandas as pd
import pytest
from gate_support import KEY, VERIFIER_KEY, evidence

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate import evidence as ev
from mlflow_tabcons.gate import keys
from mlflow_tabcons.gate.artifacts import content_digest, directory_digest


def test_sign_and_verify_round_trip():
    original = evidence("run-1", lower=0.81, predictions="0120")
    assert ev.verify_evidence(ev.sign_evidence(original, KEY), KEY) == original


def _denied(value, key=KEY) -> str:
    with pytest.raises(ev.MlflowException) as caught:
        ev.verify_evidence(value, key)
    assert caught.value.error_code == "PERMISSION_DENIED"
    return caught.value.message


def test_a_changed_number_breaks_the_signature():
    document = json.loads(ev.sign_evidence(evidence("run-1", lower=0.6), KEY))
    document["evidence"]["certified_fraction_lower"] = 0.9
    assert "tampered evidence: signature does not match" in _denied(json.dumps(document))


def test_other_key_missing_key_and_missing_tag_say_so():
    signed = ev.sign_evidence(evidence("run-1"), b"another-key-0123456789abcdef")
    assert "signed with another key" in _denied(signed)
    assert "no trainer key configured" in _denied(signed, None)
    assert "no tabcons.evidence tag" in _denied(None)
    assert "not JSON" in _denied("certified=1")
    assert "no signed payload" in _denied(json.dumps({"evidence": {}}))


def test_signed_but_invalid_payload_is_refused():
    payload = {**evidence("run-1").to_dict(), "certified_fraction": 2.0}
    value = json.dumps({"format": ev.FORMAT_VERSION, "evidence": payload, "key_id": keys.key_id(KEY),
                        "hmac_sha256": ev.hmac.new(KEY, ev.canonical_json(payload), ev.hashlib.sha256).hexdigest()})
    assert "signed but invalid evidence" in _denied(value)


def test_an_older_format_is_refused_saying_so():
    document = json.loads(ev.sign_evidence(evidence("run-1"), KEY))
    document["format"] = 5  # measured with a radius one outlier token could set
    assert "evidence format 5 is not 6" in _denied(json.dumps(document)) and "measure the version again" in _denied(json.dumps(document))


def test_a_role_is_bound_to_its_key_and_its_tag():
    """Trainer-signed evidence cannot pose as the verifier's, even when it says it is."""
    posing = ev.sign_evidence(evidence("run-1", role="verifier"), KEY)
    with pytest.raises(ev.MlflowException, match="signed with another key"):
        ev.verify_evidence(posing, VERIFIER_KEY, "verifier")
    with pytest.raises(ev.MlflowException, match="measured by the verifier, not the trainer"):
        ev.verify_evidence(posing, KEY, "trainer")
    verified = ev.sign_evidence(evidence("run-1", role="verifier"), VERIFIER_KEY)
    assert ev.verify_evidence(verified, VERIFIER_KEY, "verifier").role == "verifier"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"certified_fraction_lower": 0.95}, "interval must contain its estimate"),
        ({"predictions": "01"}, "hold 2 rows, n_eval says 100"),
        ({"alpha": 0.0}, "alpha"),
        ({"certified_fraction": 0.855}, "no whole share"),
        ({"members_learned": 1}, "members_learned must be true or false"),
        ({"role": "owner"}, "role"),
        ({"run_id": ""}, "run_id"),
    ],
)
def test_evidence_validates_its_fields(change, fragment):
    with pytest.raises(TabconsInputError, match=fragment):
        ev.Evidence(**{**evidence("run-1").to_dict(), **change})


def test_from_dict_refuses_missing_and_unknown_fields():
    data = evidence("run-1").to_dict()
    data.pop("k")
    data["extra"] = 1
    with pytest.raises(TabconsInputError, match=r"missing \['k'\], unknown \['extra'\]"):
        ev.Evidence.from_dict(data)


def test_predictions_encode_compactly():
    assert ev.encode_predictions([0, 1, 1, 0]) == "0110"
    assert ev.decode_predictions(ev.encode_predictions([3, 12, 0])) == [3, 12, 0]
    assert evidence("a", predictions="0110").predicted_classes()[:4].tolist() == [0, 1, 1, 0]


def test_content_digest_sees_every_byte_and_every_name_but_the_record_mlflow_writes_on_load(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}")
    digest = directory_digest(tmp_path / "model")
    assert digest.startswith("sha256:") and content_digest(str(tmp_path / "model")) == digest
    assert content_digest((tmp_path / "model").as_uri()) == digest
    with open(tmp_path / "model" / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    assert directory_digest(tmp_path / "model") != digest
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "model" / "MLmodel").rename(tmp_path / "model" / "MLmodel2")
    assert directory_digest(tmp_path / "model") != digest
    (tmp_path / "model" / "MLmodel2").rename(tmp_path / "model" / "MLmodel")
    (tmp_path / "model" / "registered_model_meta").write_text("model_name: m\nmodel_version: '1'\n")
    assert directory_digest(tmp_path / "model") == digest  # what MLflow writes when models:/m/1 is loaded
    (tmp_path / "model" / "data").mkdir()
    (tmp_path / "model" / "data" / "registered_model_meta").write_text("model_name: m\n")
    assert directory_digest(tmp_path / "model") != digest  # only MLflow's own file, only at the top
    with pytest.raises(TabconsInputError, match="cannot read the model files"):
        content_digest(str(tmp_path / "missing"))


def test_eval_digest_ignores_column_order_but_not_rows_or_labels():
    frame = pd.DataFrame({"age": [30, 41], "income": [1.5, 2.25], "label": ["good", "bad"]})
    digest = ev.eval_digest(frame)
    assert digest.startswith("sha256:") and digest == ev.eval_digest(frame[["label", "income", "age"]])
    assert digest != ev.eval_digest(frame.iloc[::-1])
    assert digest != ev.eval_digest(frame.assign(label=["good", "good"]))
    with pytest.raises(TabconsInputError):
        ev.eval_digest(frame.iloc[:0])


def test_key_sources_and_the_demo_key_files(tmp_path, monkeypatch):
    monkeypatch.setattr(keys, "KEY_DIRECTORY", tmp_path / "cfg")
    for role in keys.ROLES:
        monkeypatch.delenv(keys.KEY_ENV[role], raising=False)
        monkeypatch.delenv(keys.KEY_FILE_ENV[role], raising=False)
    assert keys.signing_key() is None and keys.signing_key("verifier") is None
    created = keys.ensure_signing_key()
    assert stat.S_IMODE((tmp_path / "cfg" / "evidence.key").stat().st_mode) == 0o600
    assert keys.signing_key() == created == keys.ensure_signing_key()
    assert keys.signing_key("verifier") is None  # the trainer's key file is not the verifier's
    assert keys.ensure_signing_key("verifier") != created and (tmp_path / "cfg" / "verifier.key").exists()
    (tmp_path / "k").write_text("file-key-0123456789abcdef\n")
    monkeypatch.setenv(keys.KEY_FILE_ENV["trainer"], str(tmp_path / "k"))
    assert keys.signing_key() == b"file-key-0123456789abcdef"
    monkeypatch.setenv(keys.KEY_ENV["trainer"], "env-key-0123456789abcdef")
    assert keys.signing_key() == b"env-key-0123456789abcdef"
    monkeypatch.setenv(keys.KEY_ENV["verifier"], "short")
    with pytest.raises(TabconsInputError, match="at least 16 bytes"):
        keys.signing_key("verifier")


def test_a_verifier_key_equal_to_the_trainer_key_is_refused_by_key_id(monkeypatch):
    monkeypatch.setenv(keys.KEY_ENV["trainer"], "same-key-0123456789abcdef")
    monkeypatch.setenv(keys.KEY_ENV["verifier"], "same-key-0123456789abcdef")
    assert keys.role_key("trainer") == b"same-key-0123456789abcdef"  # the trainer's own evidence still verifies
    expected = f"the verifier key is the trainer key \\(key id {keys.key_id(b'same-key-0123456789abcdef')}\\)"
    with pytest.raises(TabconsInputError, match=expected):
        keys.role_key("verifier")
    with pytest.raises(TabconsInputError, match="give the verifier its own key"):
        keys.ensure_signing_key("verifier")  # `tabcons verify` signs nothing with it
    monkeypatch.setenv(keys.KEY_ENV["verifier"], "other-key-0123456789abcdef")
    assert keys.role_key("verifier") == b"other-key-0123456789abcdef"


def test_reserved_tags():
    assert all(ev.is_reserved_tag(k) for k in ("tabcons.evidence", "tabcons.verdict.champion", "tabcons.audit.x"))
    assert ev.is_reserved_tag("tabcons.evidence.verified")
    assert ev.is_reserved_tag("TABCONS.Evidence.Verified")  # one row with the real key on MySQL and MariaDB
    assert ev.is_break_glass_tag("Tabcons.Break_Glass.champion") and not ev.is_break_glass_tag("tabcons.break_glassy")
    assert not any(ev.is_reserved_tag(k) for k in ("tabcons.break_glass.champion", "tabcons.role", "owner"))
