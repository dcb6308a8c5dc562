"""The trust chain's parts on their own: the hash-chained audit log, signed promotion records, the
champion a replica may load, token expiry and the one-time bootstrap."""

from __future__ import annotations

import io
import json
import time

import pytest

from oncoserve.audit import AuditLog
from oncoserve.auth import AuthError, Identity, TokenStore
from oncoserve.signing import Signer, UntrustedRecord, Verifier
from serving import promotion_ledger as ledger
from tests.helpers import MemoryStore, wait_until


def _log(tmp_path) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    first = log.begin("ann", "platform", "promote", task="segmentation", version="3", to="champion", forced=False)
    log.finish(first, "completed")
    log.event("bob", "data-scientist", "register", task="survival", version="1")
    second = log.begin("cat", "admin", "promote", task="segmentation", version="4", to="champion", forced=True, reason="drill")
    log.finish(second, "completed")
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def test_an_intact_chain_verifies(tmp_path):
    log = _log(tmp_path)
    result = log.verify()
    assert result.ok and result.records == 5 and result.first_bad is None
    records = [json.loads(line) for line in _lines(log)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert all(records[i]["prev"] == records[i - 1]["hash"] for i in range(1, 5))


@pytest.mark.parametrize("tamper, line", [
    ("edit", 4),      # the forced promotion's actor rewritten
    ("delete", 3),    # a record removed: the next one no longer follows
    ("reorder", 2),   # two records swapped
])  # fmt: skip
def test_verify_names_the_first_record_edited_deleted_or_reordered(tmp_path, tamper, line):
    log = _log(tmp_path)
    lines = _lines(log)
    if tamper == "edit":
        record = json.loads(lines[3])
        record["actor"] = "someone-else"
        lines[3] = json.dumps(record, sort_keys=True)
    elif tamper == "delete":
        del lines[2]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    log.path.write_text("\n".join(lines) + "\n")
    result = log.verify()
    assert not result.ok and result.first_bad == line, result


def test_recomputing_an_edited_records_hash_is_still_caught_at_the_next_one(tmp_path):
    from oncoserve.audit import record_hash

    log = _log(tmp_path)
    lines = _lines(log)
    record = json.loads(lines[1])
    record["outcome"] = "forged"
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, sort_keys=True)
    log.path.write_text("\n".join(lines) + "\n")
    result = log.verify()
    assert not result.ok and result.first_bad == 3 and "does not follow" in result.problem


def test_a_corrupt_line_is_reported_not_fatal_and_the_chain_goes_on(tmp_path):
    log = _log(tmp_path)
    with open(log.path, "a") as handle:
        handle.write('{"torn": \n')
    log.event("dan", "viewer", "analyze", task="segmentation")
    read = log.read()
    assert len(read.records) == 6 and read.problems == ["line 6: unreadable (Expecting value: line 1 column 10 (char 9))"]
    assert [e["actor"] for e in log.entries()][-1] == "dan"
    result = log.verify()
    assert not result.ok and result.first_bad == 6


def test_an_outcome_never_rewrites_the_intent(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    action = log.begin("cat", "admin", "promote", task="segmentation", version="4", forced=True, reason="drill")
    # An outcome that tries to clear the actor and the forced flag: separate record, ignored fields.
    log._append({"action_id": action, "phase": "completed", "time": time.time(), "actor": "nobody", "forced": False})
    log.finish(action, "failed", error="late")
    entry = log.entries()[0]
    assert entry["actor"] == "cat" and entry["forced"] is True and entry["reason"] == "drill"
    assert entry["status"] == "completed" and "error" not in entry  # the first outcome counts, once
    assert log.verify().ok


def test_an_intent_without_outcome_is_incomplete(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.begin("ann", "platform", "rollback", task="survival", version="2")
    assert log.entries()[0]["status"] == "incomplete"


def test_signed_records_verify_and_any_edit_or_other_key_fails(tmp_path):
    signer = Signer.load_or_create(tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub")
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    again = Signer.load_or_create(tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub")
    assert again.key_id == signer.key_id  # the key is made once
    verifier = Verifier.from_file(tmp_path / "k" / "signing.pub")
    signed = signer.sign({"task": "segmentation", "version": "3", "seq": 1})
    assert verifier.verify(signed)["version"] == "3"
    edited = json.loads(json.dumps(signed))
    edited["record"]["version"] = "7"
    with pytest.raises(UntrustedRecord, match="does not verify"):
        verifier.verify(edited)
    other = Signer.load_or_create(tmp_path / "o" / "signing.key", tmp_path / "o" / "signing.pub")
    with pytest.raises(UntrustedRecord, match="does not verify"):
        verifier.verify(other.sign({"task": "segmentation", "version": "7", "seq": 9}))
    with pytest.raises(UntrustedRecord, match="not a signed"):
        verifier.verify({"record": "x"})


def _record(task="segmentation", version="3", seq=1):
    return {"task": task, "alias": "champion", "version": version, "seq": seq, "artifact_sha256": {}}


def test_a_replica_admits_only_the_signed_champion_and_never_an_older_record(tmp_path):
    signer = Signer.load_or_create(tmp_path / "signing.key", tmp_path / "signing.pub")
    store = MemoryStore()
    trust = ledger.ChampionTrust(store, "models", Verifier(signer.public_pem), "segmentation")
    assert not trust.decide("3").trusted and "no signed promotion record" in trust.decide("3").reason
    ledger.publish(store, "models", signer.sign(_record(version="3", seq=1)))
    assert trust.decide("3").trusted
    moved = trust.decide("7")
    assert not moved.trusted and "names v3" in moved.reason
    ledger.publish(store, "models", signer.sign(_record(version="4", seq=2)))
    assert trust.decide("4", serving_seq=2).trusted
    stale = signer.sign(_record(version="3", seq=1))  # a replayed earlier record put back as head
    store.put_object("models", "promotions/segmentation/head.json", io.BytesIO(json.dumps(stale).encode()), 0)
    replay = trust.decide("3", serving_seq=2)
    assert not replay.trusted and "replayed" in replay.reason
    forged = Signer.load_or_create(tmp_path / "x.key", tmp_path / "x.pub").sign(_record(version="7", seq=3))
    store.put_object("models", "promotions/segmentation/head.json", io.BytesIO(json.dumps(forged).encode()), 0)
    assert "does not verify" in trust.decide("7").reason
    assert [s["record"]["seq"] for s in ledger.history(store, "models", "segmentation")] == [1, 2]


def test_tokens_expire_and_bootstrap_never_reopens(tmp_path):
    store = TokenStore(tmp_path / "auth" / "tokens.json")
    root = store.create("root", "admin", None)
    admin = store.authenticate(root)
    short = store.create("short", "app", admin, expires_in_s=0.05)
    created = time.time()
    assert store.authenticate(short) == Identity("short", "app")
    assert wait_until(lambda: time.time() > created + 0.1, timeout_s=2)
    with pytest.raises(AuthError, match="expired"):
        store.authenticate(short)
    store.revoke("short", admin)
    store.revoke("root", admin)
    assert store.list() == []
    with pytest.raises(AuthError, match="needs a token"):  # every token revoked: no fresh admin for the asking
        store.create("intruder", "admin", None)
    with pytest.raises(ValueError, match="lifetime"):
        store.create("x", "app", admin, expires_in_s=-1)
