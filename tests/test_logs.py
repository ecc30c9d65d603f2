"""Logs as a pipeline reads them (`--log-format json`): one JSON event per line with time,
level, logger and event, the request id and the authenticated caller where a call is being
served; and never a field value or a user id, whatever path the data took."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from residency.server.deployment import AFFILIATES, PRIMARY
from residency.v1 import admin_pb2, admin_pb2_grpc, disclosure_pb2, records_pb2
from tests.conftest import Cluster, ctx

USER = "u-sentinel-logs-93c1"
VALUES = {
    "name": "Sentinel Name Qx7",
    "email": "sentinel.qx7@example.cn",
    "ip_address": "10.77.93.1",
    "password": "sentinel-pass-qx7-0",
}


def events(cluster: Cluster, region: str) -> list[dict]:
    lines = (cluster.data_dir(region) / "node.log").read_text().splitlines()
    assert lines
    out = []
    for line in lines:
        event = json.loads(line)  # every line is one JSON event
        assert {"time", "level", "logger", "event"} <= set(event), line
        out.append(event)
    return out


async def test_json_logs_carry_the_caller_and_never_a_value_or_user_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("RESIDENCY_LOG_FORMAT", "json")
    cluster = Cluster(tmp_path / "deployment")
    try:
        await cluster.start()
        # Through every path: write, read here and from another region, consent, grant,
        # replicate, read a copy, disclose, refuse, erase.
        await cluster.put(USER, VALUES)
        await cluster.get(USER)
        await cluster.get(USER, location=AFFILIATES[0])
        await cluster.accept_cookies(USER)
        await cluster.grant([USER], ["user.contact"], recipient="sg-affiliate")
        await cluster.replicated()
        await cluster.held(USER, AFFILIATES[0])
        await cluster.disclose(
            USER,
            disclosure_pb2.DISCLOSURE_GROUND_JUDICIAL_OR_ADMINISTRATIVE_REQUEST,
            third_party="Haidian District Court",
            reference="R-1",
        )
        with pytest.raises(grpc.aio.AioRpcError):  # a value of the wrong type, refused
            bad = records_pb2.Record(user_id=USER, source="registration")
            bad.fields["email"].int_value = 7
            await cluster.records().PutRecord(
                records_pb2.PutRecordRequest(context=ctx(PRIMARY, "essential.service"), record=bad),
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError):  # a caller without the permission, refused
            await cluster.disclosures("recipient", "sg-affiliate").ApproveDisclosure(
                disclosure_pb2.ApproveDisclosureRequest(id="d-" + USER), timeout=10
            )
        # An operator's act is logged with who did it and the request id it sent.
        admin = admin_pb2_grpc.AdminServiceStub(cluster.channel(PRIMARY, "operator", PRIMARY))
        await admin.PauseReplication(
            admin_pb2.PauseReplicationRequest(region=AFFILIATES[1]),
            metadata=(("x-request-id", "req-logs-1"),),
            timeout=10,
        )
        await cluster.delete(USER)
        await cluster.admin().ResumeReplication(
            admin_pb2.ResumeReplicationRequest(region=AFFILIATES[1]), timeout=10
        )
        await cluster.replicated()
    finally:
        await cluster.close()  # stops the nodes: their logs are complete
    paused = [e for e in events(cluster, PRIMARY) if e["event"] == f"replication to {AFFILIATES[1]} paused"]
    assert len(paused) == 1
    assert paused[0]["request_id"] == "req-logs-1"
    assert paused[0]["identity"] == "spiffe://residency/operator/cn-north/operator"
    for region in (PRIMARY, *AFFILIATES):
        text = (cluster.data_dir(region) / "node.log").read_text()
        events(cluster, region)
        for secret in (USER, *VALUES.values()):
            assert secret not in text, (region, secret)
