"""A silo's part in a secure-aggregation round, over the Fleet service."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.client.messages import ClientStats, result_messages
from fedpriv.client.tasks import TaskLimits
from fedpriv.errors import ProtocolError
from fedpriv.faults import FaultPoint, reach
from fedpriv.privacy.central import secure_generator
from fedpriv.secagg import ClientSession
from fedpriv.secagg.fused import encode_masked, secagg_threads, upload_buffer
from fedpriv.secagg.relay import collect_contributions, collect_peers, collect_shares
from fedpriv.secagg.settings import SecAggSettings
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from fedpriv.wire import scalars_to_proto
from fedpriv.wire.resources import Resources

__all__ = ["SecureUpload"]

logger = logging.getLogger(__name__)


class SecureUpload:
    """This silo's part in a secure-aggregation round (see :mod:`fedpriv.secagg`)."""

    def __init__(
        self,
        stub: fleet_pb2_grpc.FleetStub,
        task: fleet_pb2.Task,
        settings: SecAggSettings,
        stats: ClientStats,
        limits: TaskLimits | None = None,
    ) -> None:
        limits = limits or TaskLimits()
        self.codec = settings.codec
        self.layout = settings.layout
        self.session = ClientSession(
            silo=stats.silo,
            session=settings.session,
            round=task.round,
            threshold=settings.threshold,
            degree=settings.degree,
            max_dropped=settings.max_dropped,
            corrupt_fraction=limits.secagg_corrupt_fraction,
            security_bits=limits.secagg_security_bits,
        )
        self.threads = secagg_threads()
        self._stub = stub
        self._task = task
        self._stats = stats
        self._limits = limits

    def _call(self, timeout: float | None, **step: Any) -> fleet_pb2.SecAggReply:
        request = fleet_pb2.SecAggRequest(
            task_id=self._task.task_id, round=self._task.round, **step
        )
        reply: fleet_pb2.SecAggReply = self._stub.SecAgg(request, timeout=timeout)
        return reply

    def setup(self, *, timeout: float | None) -> None:
        """Advertise keys, then exchange encrypted shares with the other silos.

        Raises:
            SecAggError: The coordinator's key list or relayed shares are
                inconsistent (see :class:`~fedpriv.secagg.ClientSession`).
            ProtocolError: Too few silos with usable keys or shares.
        """
        cipher, mask = self.session.advertise()
        reply = self._call(
            timeout,
            advertise=fleet_pb2.AdvertiseKeys(
                cipher_public_key=cipher,
                mask_public_key=mask,
                graph_commitment=self.session.commitment,
            ),
        )
        peers = collect_peers((p.silo, p.cipher_public_key, p.mask_public_key) for p in reply.peers)
        self.session.set_peers(peers, {p.silo: p.graph_commitment for p in reply.peers})
        # The fewest updates the coordinator may unmask: the noise must cover them.
        fewest = (
            len(peers) - self.session.max_dropped if self.session.degree else self.session.threshold
        )
        refusal = self._limits.noise_refusal(self.codec, survivors=fewest)
        if refusal is not None:
            raise ProtocolError(refusal)  # declined before training and before any share
        if self.session.degree:
            reply = self._call(
                timeout, graph=fleet_pb2.GraphSeed(contribution=self.session.open_contribution())
            )
            self.session.set_graph(
                collect_contributions((c.silo, c.contribution) for c in reply.contributions),
                list(reply.neighbours),
            )
        shares = self.session.share()
        reply = self._call(
            timeout,
            share=fleet_pb2.ShareKeys(
                shares=[
                    fleet_pb2.EncryptedShares(silo=name, ciphertext=ciphertext)
                    for name, ciphertext in shares.items()
                ]
            ),
        )
        self.session.receive(collect_shares((s.silo, s.ciphertext) for s in reply.shares))
        for sender in self.session.invalid_senders:
            # Reported to the coordinator too: the reveal leaves this sender's shares out.
            logger.warning(
                "secagg share did not authenticate round=%d silo=%s invalid_share_from=%s",
                self._task.round,
                self._stats.silo,
                sender,
            )

    def push(
        self,
        parameters: Mapping[str, npt.NDArray[Any]],
        start: Mapping[str, npt.NDArray[Any]],
        *,
        num_examples: int,
        metrics: Mapping[str, Scalar],
        timeout: float | None,
        resources: Resources | None = None,
    ) -> None:
        """Mask and send the update, then reveal shares so the sum can be unmasked."""
        names = list(start)
        started = time.perf_counter()
        # Clip, scale, round, noise and mask in one pass over cache-sized slices, straight
        # from the tensors into the upload buffer. One thread by default: the pass makes
        # thousands of short GIL releases, and threads of a process that shares its cores
        # with others queue for the GIL (8 silos on 2 cores: 10.5 s instead of 0.9 s).
        ring = upload_buffer(self.codec.size)
        encode_masked(
            self.codec,
            [parameters[name] for name in names],
            [start[name] for name in names],
            self.session.mask_seeds(),
            ring,
            generator=secure_generator,
            threads=self.threads,
        )
        encoded = time.perf_counter()
        header = fleet_pb2.ResultHeader(
            task_id=self._task.task_id,
            round=self._task.round,
            kind=self._task.kind,
            num_examples=num_examples,
            metrics=scalars_to_proto(metrics),
            update=self.layout.to_proto(),
            resources=None if resources is None else resources.to_proto(),
        )
        messages = result_messages(
            header, self.layout, {"secagg": ring.view(np.int32)}, self._stats
        )
        self._stub.PushResult(messages, timeout=timeout)
        reach(FaultPoint.AFTER_MASKED_UPLOAD_BEFORE_UNMASK)
        logger.info(
            "masked update sent round=%d encode_mask_s=%.3f",
            self._task.round,
            encoded - started,
        )
        # The roster comes when the round's uploads are summed: wait as long as the round.
        reply = self._call(
            None if timeout is None else timeout + 600, roster=fleet_pb2.RosterRequest()
        )
        seeds, keys = self.session.reveal(
            survivors=list(reply.survivors), dropped=list(reply.dropped)
        )
        self._call(
            60.0,
            unmask=fleet_pb2.UnmaskShares(
                self_mask=[fleet_pb2.RevealedShare(silo=n, x=x, y=y) for n, x, y in seeds],
                mask_key=[fleet_pb2.RevealedShare(silo=n, x=x, y=y) for n, x, y in keys],
            ),
        )
