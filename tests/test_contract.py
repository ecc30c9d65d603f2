"""The API contract: generated code current, buf lint clean, health and reflection served."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from residency.server.deployment import PRIMARY
from tests.conftest import Cluster

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_buf_lint_is_clean():
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    r = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_reflection_lists_every_service_and_health_answers(cluster: Cluster):
    ch = cluster.channel(PRIMARY)
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    names = set()
    async for reply in stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names |= {s.name for s in reply.list_services_response.service}
    assert {
        "residency.v1.RecordService",
        "residency.v1.ReplicaService",
        "residency.v1.TransferLogService",
        "residency.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "residency.v1.RecordService"):
        r = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    try:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        raise AssertionError("unknown service should be NOT_FOUND")
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_ruff_lint_and_format_are_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        r = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
