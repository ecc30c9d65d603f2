"""The replica sink: a region node, over gRPC `ReplicaService.ApplyCopies` with mutual TLS
(the primary presents its node certificate)."""

from __future__ import annotations

import contextlib

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from residency.replicator.lease import Fence, StandDown
from residency.server.config.tls import TlsConfig
from residency.server.core.errors import KeyShredded, StaleLeaseEpoch
from residency.server.core.signed import copy_bytes
from residency.v1 import replica_pb2, replica_pb2_grpc


class ReplicaSink:
    """A region node, over gRPC `ReplicaService`."""

    kind = "replica"
    # A region node takes a batch's copies vouched for by its signed high-water mark.
    signs_each_copy = False
    TRANSIENT = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.CANCELLED,
            # The node's certificate expired or was revoked, or the region's CA changed: the
            # copies are not at fault. The next call goes with the files as they are then.
            grpc.StatusCode.UNAUTHENTICATED,
        }
    )

    def __init__(self, address: str, tls: TlsConfig, timeout: float = 5.0):
        self.target = address
        self.timeout = timeout
        self._tls = tls
        self._open()

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        tls = self._tls
        return tuple((s.st_mtime_ns, s.st_size) for s in (p.stat() for p in (tls.cert, tls.key, tls.ca)))

    def _open(self) -> None:
        """A channel with the node's certificate, key and CA as the files hold them now."""
        tls = self._tls
        stamp = self._stamp()
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes(),
            certificate_chain=tls.cert.read_bytes(),
        )
        self._seen = stamp
        self._channel = grpc.aio.secure_channel(
            self.target, creds, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self._stub = replica_pb2_grpc.ReplicaServiceStub(self._channel)
        # ApplyCopies in its wire form: each copy as the bytes its batch's mark hashed.
        self._apply = self._channel.unary_unary(
            "/residency.v1.ReplicaService/ApplyCopies",
            request_serializer=replica_pb2.ApplyCopiesWire.SerializeToString,
            response_deserializer=replica_pb2.ApplyCopiesResponse.FromString,
        )

    async def _reopen(self) -> None:
        old = self._channel
        self._open()
        await old.close()

    async def _fresh(self) -> None:
        """A certificate renewed on disk (cert-manager, `residency certs issue`, then SIGHUP
        for the node's own listener) is presented from the next call on, over a new
        connection: a region node refuses an expired one even on a connection opened before.
        A file that cannot be read now keeps the connection there is."""
        try:
            changed = self._stamp() != self._seen
        except OSError:
            return
        if changed:
            await self._reopen()

    async def _renew_after(self, e: grpc.aio.AioRpcError) -> None:
        """After a call ran out of time, the next one goes over a new connection. A link
        that went dead without a reset (a region cut off) leaves the old TCP connection
        retransmitting with backoff: kept, it carried nothing for about 25 s after a 30 s
        cut healed (tests/faults/test_netns.py); a new one gets through at once. So after a
        refused certificate: the new connection presents the files as they are then. One call
        at a time uses the sink (its destination's loop), so none is cut short here."""
        if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED):
            with contextlib.suppress(OSError):  # the files are being replaced: the next call looks again
                await self._reopen()

    async def apply(
        self,
        source_region: str,
        copies: list[replica_pb2.SealedCopy],
        high_water: replica_pb2.HighWater | None = None,
        fence: Fence | None = None,
    ) -> None:
        await self._fresh()
        request = replica_pb2.ApplyCopiesWire(
            source_region=source_region, copies=[copy_bytes(c) for c in copies], high_water=high_water
        )
        try:
            await self._apply(
                request, timeout=self.timeout if fence is None else min(self.timeout, fence.remaining())
            )
        except grpc.aio.AioRpcError as e:
            await self._renew_after(e)
            info = _error_info(e)
            if info.reason == StaleLeaseEpoch.REASON:
                # A newer lease holder has shipped here: this batch is that holder's to send.
                seen = info.metadata.get("seen", "")
                raise StandDown(self.target, int(seen) if seen.isdigit() else 0) from e
            raise

    def key_shredded(self, e: BaseException) -> str | None:
        if isinstance(e, grpc.aio.AioRpcError) and _error_info(e).reason == KeyShredded.REASON:
            return e.details()
        return None

    async def region_key(self, nonce: bytes) -> bytes | None:
        await self._fresh()
        try:
            reply = await self._stub.GetRegionKey(
                replica_pb2.GetRegionKeyRequest(nonce=nonce), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            await self._renew_after(e)
            raise
        return reply.SerializeToString()

    def permanent(self, e: BaseException) -> str | None:
        if isinstance(e, grpc.aio.AioRpcError) and e.code() not in self.TRANSIENT:
            return f"{e.code().name}: {e.details()}"
        return None

    async def close(self) -> None:
        await self._channel.close()


def _error_info(e: BaseException) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a FAILED_PRECONDITION refusal (a key shredded, a stale lease epoch), or
    an empty one."""
    info = error_details_pb2.ErrorInfo()
    if not isinstance(e, grpc.aio.AioRpcError) or e.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return info
    status = rpc_status.from_call(e)
    for detail in status.details if status else ():
        if detail.Unpack(info):
            return info
    return error_details_pb2.ErrorInfo()
