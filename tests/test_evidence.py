"""Signed evidence: round trip, tampering, keys, the evaluation-set digest, churn."""

from __future__ import annotations

import json
import stat

import pandas as pd
import pytest
from gate_support import KEY, evidence

from mlflow_tabcons.gate import evidence as ev
from mlflow_tabcons.errors import TabconsInputError


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
    assert "no evidence key configured" in _denied(signed, None)
    assert "no tabcons.evidence tag" in _denied(None)
    assert "not JSON" in _denied("certified=1")
    assert "no signed payload" in _denied(json.dumps({"evidence": {}}))


def test_signed_but_invalid_payload_is_refused():
    payload = {**evidence("run-1").to_dict(), "certified_fraction": 2.0}
    value = json.dumps({"format": ev.FORMAT_VERSION, "evidence": payload, "key_id": ev.key_id(KEY),
                        "hmac_sha256": ev.hmac.new(KEY, ev._canonical(payload), ev.hashlib.sha256).hexdigest()})
    assert "signed but invalid evidence" in _denied(value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"certified_fraction_lower": 0.95}, "interval must contain its estimate"),
        ({"predictions": "01"}, "hold 2 rows, n_eval says 4"),
        ({"alpha": 0.0}, "alpha"),
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


def test_predictions_encode_compactly_and_churn_counts_changes():
    assert ev.encode_predictions([0, 1, 1, 0]) == "0110"
    assert ev.decode_predictions(ev.encode_predictions([3, 12, 0])) == [3, 12, 0]
    assert ev.churn(evidence("a", predictions="0110"), evidence("b", predictions="0111")) == 0.25
    with pytest.raises(TabconsInputError, match="same evaluation set"):
        ev.churn(evidence("a"), evidence("b", digest="sha256:other"))


def test_eval_digest_ignores_column_order_but_not_rows_or_labels():
    frame = pd.DataFrame({"age": [30, 41], "income": [1.5, 2.25], "label": ["good", "bad"]})
    digest = ev.eval_digest(frame)
    assert digest.startswith("sha256:") and digest == ev.eval_digest(frame[["label", "income", "age"]])
    assert digest != ev.eval_digest(frame.iloc[::-1])
    assert digest != ev.eval_digest(frame.assign(label=["good", "good"]))
    with pytest.raises(TabconsInputError):
        ev.eval_digest(frame.iloc[:0])


def test_key_sources_and_the_demo_key_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "DEFAULT_KEY_FILE", tmp_path / "cfg" / "evidence.key")
    monkeypatch.delenv(ev.KEY_ENV, raising=False)
    monkeypatch.delenv(ev.KEY_FILE_ENV, raising=False)
    assert ev.evidence_key() is None
    created = ev.ensure_evidence_key()
    assert stat.S_IMODE((tmp_path / "cfg" / "evidence.key").stat().st_mode) == 0o600
    assert ev.evidence_key() == created == ev.ensure_evidence_key()
    (tmp_path / "k").write_text("file-key-0123456789abcdef\n")
    monkeypatch.setenv(ev.KEY_FILE_ENV, str(tmp_path / "k"))
    assert ev.evidence_key() == b"file-key-0123456789abcdef"
    monkeypatch.setenv(ev.KEY_ENV, "env-key-0123456789abcdef")
    assert ev.evidence_key() == b"env-key-0123456789abcdef"
    monkeypatch.setenv(ev.KEY_ENV, "short")
    with pytest.raises(TabconsInputError, match="at least 16 bytes"):
        ev.evidence_key()


def test_reserved_tags():
    assert all(ev.is_reserved_tag(k) for k in ("tabcons.evidence", "tabcons.verdict.champion", "tabcons.audit.x"))
    assert not any(ev.is_reserved_tag(k) for k in ("tabcons.break_glass", "tabcons.role", "owner"))
