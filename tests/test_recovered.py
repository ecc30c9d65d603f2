"""What a restore reads out of recovered transfer-log entries (`core.recovered`): only the
home's own acts count, whoever else's entries say the same."""

from __future__ import annotations

from residency.server.core import translog
from residency.server.core.policy.erasure import ERASED
from residency.server.core.recovered import RESTORE_ACTOR, read_recovered, to_reversion

HOME = "cn-north"


def sent(kind: str, user: str, version: int, **rest: str) -> dict:
    e = translog.entry(
        kind,
        subject=user,
        source_region=rest.pop("source_region", HOME),
        destination_region="ap-southeast-1",
        outcome="allowed",
        actor=rest.pop("actor", "replicator"),
        rules_version="v1",
        version=version,
        **rest,
    )
    return {**e, "sequence": 7, "time": 1.0}


def test_erasures_consents_and_versions_sent_are_read_from_the_homes_entries_only():
    entries = [
        sent("replication", "a", 3),
        sent("replication", "a", 5),
        sent("erasure", "b", 2, reason=ERASED),
        sent(
            "erasure", "c", 4, reason="withdrawn: no field of this record may be held in ap-southeast-1 now"
        ),
        # Liars and others: a region's own sweep, another home, an operator naming the reason.
        sent("erasure", "d", 9, reason=ERASED, actor="retention-sweep"),
        sent("erasure", "e", 9, reason=ERASED, source_region="eu-west-1"),
        sent(
            "consent",
            "f",
            0,
            actor="spiffe://residency/service/cn-north/app",
            purpose="marketing.communications",
            recipient="ie-affiliate",
            reason="withdrawn (sensitive personal information)",
        ),
        {
            **translog.admin(HOME, RESTORE_ACTOR, "v1", "... under restore epoch 3 (every version ..."),
            "sequence": 8,
        },
        {
            **translog.admin(HOME, "spiffe://residency/operator/cn-north/x", "v1", "restore epoch 9"),
            "sequence": 9,
        },
    ]
    r = read_recovered(entries, HOME)
    assert r.erased == ["b"]
    assert r.sent == {"a": 5, "b": 2, "c": 4}
    assert r.epoch == 3
    (c,) = r.consents
    assert (c.change.user_id, c.change.sensitive, c.withdraw) == ("f", True, True)
    assert c.change.evidence == "re-applied at a restore from transfer-log entry 7"


def test_only_users_live_in_the_backup_whose_copies_may_be_ahead_are_reversioned():
    held = {"a": 5, "b": 2, "q": 1, "z": 1}
    # a: sent at the version the backup holds (not ahead); b: sent above it; q: queued at the
    # backup; n: not in the backup (cannot be re-versioned); z: untouched.
    assert to_reversion({"a": 5, "b": 3, "n": 1}, ["q", "n"], held) == ["b", "q"]


def test_a_homes_own_erasure_entry_counts_though_no_tombstone_left():
    def at_home(user: str, **rest: str) -> dict:
        e = translog.entry(
            "erasure",
            subject=user,
            source_region=rest.pop("source_region", HOME),
            destination_region=rest.pop("destination_region", HOME),
            outcome=rest.pop("outcome", "allowed"),
            actor="spiffe://residency/service/cn-north/app",
            rules_version="v1",
            version=4,
        )
        return {**e, "sequence": 3, "time": 1.0}

    entries = [
        at_home("h"),  # erased at home, replication paused or no affiliates: nothing sent
        at_home("i", outcome="denied"),
        at_home("j", source_region="eu-west-1", destination_region="eu-west-1"),
    ]
    r = read_recovered(entries, HOME)
    assert r.erased == ["h"]
    assert r.sent == {}  # nothing left the home region
