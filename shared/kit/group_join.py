"""Getting a consumer into its group when the broker keeps it out.

What the embedded broker (Tansu 0.6, ``tansu-broker/src/coordinator/group/administrator.rs``)
does, as measured here and read in its group coordinator:

- a group forms when its *leader* sends the assignments in SyncGroup; every other member's
  SyncGroup is refused with REBALANCE_IN_PROGRESS until then, and it joins again;
- LeaveGroup is honoured, but while the group is *forming* (a rebalance in progress) it removes
  the member and leaves the group's leader as it was. When the members of a group stop together
  (a graceful stop of a service whose group has two members, e.g. subsidy's trip consumers), one
  leave turns the formed group into a forming one that keeps its leader, and if the leader leaves
  last, the group is left empty with a leader that is gone;
- nothing ever clears that leader: the session timeout only evicts members, and the leader is no
  longer one. Every JoinGroup is answered with it (so the joiner is a follower) and every SyncGroup
  with REBALANCE_IN_PROGRESS, for any client, for ever. A brand new group, or restarting the
  in-memory broker (which forgets every group and offset), was the only way out.

The way out kept here keeps the group and its committed offsets: join under the departed leader's
member id (the broker names it in every JoinGroup response; joining with a member id it does not
know makes it a member again, and so the leader), complete the round with an empty assignment for
every member, then leave. A formed group's leave is the one that clears a departed leader, so the
next JoinGroup of a real member makes it the leader, and the group forms as usual from its
committed offsets. ``JoinWatch`` measures how long a member has been without an assignment; the
runtime (``ServiceRuntime``) reports it on /readyz and calls ``release_departed_leader`` past
``consumer_join_timeout_ms``.

On Apache Kafka the leader is always a live member, so the release finds nothing to do (it only
costs the probe's join and leave, i.e. one more rebalance of a group that was not joining anyway).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import for_code
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest

import shared.kit.kafka_client  # noqa: F401  (topics are never auto-created)
from shared.kit.kafka_security import KafkaConnection

log = structlog.get_logger(__name__)

_NO_ERROR = 0
_MEMBER_ID_REQUIRED = 79
_REBALANCE_IN_PROGRESS = 27
#: The assignors a kit consumer (aiokafka: roundrobin) or another client (librdkafka: range) offers;
#: a forming group only accepts a joiner that offers the protocol it already chose.
_PROTOCOLS = ("roundrobin", "range")
_EMPTY_ASSIGNMENT: bytes = ConsumerProtocolMemberAssignment(0, [], b"").encode()


class JoinWatch(ConsumerRebalanceListener):  # type: ignore[misc]
    """A member's rebalance listener that keeps how long it has been without an assignment.

    aiokafka calls ``on_partitions_revoked`` once when a join starts (the first one, and every
    rebalance), and ``on_partitions_assigned`` when the group formed with this member in it."""

    def __init__(self) -> None:
        self.joined = False
        self._waiting_since: float | None = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.joined = False
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.joined, self._waiting_since = True, None

    def waiting_s(self) -> float:
        """Seconds since this member started (re)joining without getting in; 0 once joined."""
        return 0.0 if self._waiting_since is None else time.monotonic() - self._waiting_since


@dataclass(frozen=True, slots=True)
class Release:
    """What ``release_departed_leader`` found and did."""

    released: bool
    outcome: str
    leader: str | None = None


async def release_departed_leader(
    bootstrap: str | KafkaConnection, group_id: str, topics: Sequence[str], *, session_timeout_ms: int
) -> Release:
    """Clear a leader the broker keeps for a group it has left (see the module doc); keeps offsets.

    Does nothing when the group's leader is one of its members. Costs about two JoinGroup waits
    of the broker (half the group's session timeout each, on Tansu)."""
    # The broker holds a JoinGroup up to half the group's session timeout: wait longer than that.
    client = AIOKafkaClient(
        **(bootstrap if isinstance(bootstrap, KafkaConnection) else KafkaConnection(bootstrap)).aiokafka_kwargs(),
        client_id="nichiiki-group-release",
        request_timeout_ms=max(60_000, 2 * session_timeout_ms),
    )
    await client.bootstrap()
    try:
        group = _Group(client, await client.coordinator_lookup(CoordinationType.GROUP, group_id), group_id)
        metadata = ConsumerProtocolMemberMetadata(0, list(topics), b"").encode()
        probe = await group.join("", metadata, session_timeout_ms)
        if probe.error_code != _NO_ERROR:
            return Release(False, f"the probe could not join: {for_code(probe.error_code).__name__}")
        leader, prober = probe.leader_id, probe.member_id
        if leader == prober:
            # No member led the group: the probe leads it now. Left while forming, it would stay
            # the group's leader (the very fault), so it completes the round before it leaves.
            return await group.complete_round_and_leave(prober, metadata, session_timeout_ms, probe)
        members = await group.members()
        await group.leave(prober)  # a follower: its leave is harmless while the group forms
        if leader in members:
            return Release(False, "the group's leader is a live member", leader)
        log.warning("the broker keeps a departed leader for the group; releasing it", group=group_id, leader=leader)
        adopted = await group.join(leader, metadata, session_timeout_ms)
        if adopted.error_code != _NO_ERROR or adopted.leader_id != leader:
            error = for_code(adopted.error_code).__name__
            return Release(False, f"could not join as the departed leader: {error}", leader)
        return await group.complete_round_and_leave(leader, metadata, session_timeout_ms, adopted)
    finally:
        await client.close()


class _Group:
    """The group protocol requests of one group, on its coordinator's connection."""

    def __init__(self, client: AIOKafkaClient, node_id: int, group_id: str) -> None:
        self.client, self.node_id, self.group_id = client, node_id, group_id

    async def _send(self, request: Any) -> Any:
        return await self.client.send(self.node_id, request, group=ConnectionGroup.COORDINATION)

    async def join(self, member_id: str, metadata: bytes, session_timeout_ms: int) -> Any:
        """JoinGroup; a new member first gets its member id (MEMBER_ID_REQUIRED) and joins with it."""
        for _ in range(2):
            response = await self._send(JoinGroupRequest(
                self.group_id, session_timeout_ms, session_timeout_ms, member_id, None,
                "consumer", [(name, metadata) for name in _PROTOCOLS],
            ))
            if response.error_code != _MEMBER_ID_REQUIRED:
                return response
            member_id = response.member_id
        return response

    async def sync(self, generation: int, member_id: str, members: Sequence[str]) -> int:
        response = await self._send(SyncGroupRequest(
            self.group_id, generation, member_id, None,
            [(member, _EMPTY_ASSIGNMENT) for member in members],
        ))
        return int(response.error_code)

    async def leave(self, member_id: str) -> int:
        response = await self._send(LeaveGroupRequest(self.group_id, member_id))
        return int(response.error_code)

    async def members(self) -> set[str]:
        response = await self._send(DescribeGroupsRequest([self.group_id]))
        return {member["member_id"] for group in response.to_object()["groups"] for member in group["members"]}

    async def complete_round_and_leave(
        self, member_id: str, metadata: bytes, session_timeout_ms: int, joined: Any, attempts: int = 4
    ) -> Release:
        """As the group's leader: form the group (every member an empty assignment), then leave it.

        A member that joins meanwhile makes the broker refuse the assignments (they must name every
        member): join again for the new list and retry."""
        for _ in range(attempts):
            members = [member[0] for member in joined.members]
            error = await self.sync(joined.generation_id, member_id, members)
            if error == _NO_ERROR:
                await self.leave(member_id)  # a formed group's leave clears its leader
                log.info("departed leader released", group=self.group_id, leader=member_id, members=len(members))
                return Release(True, "released", member_id)
            if error != _REBALANCE_IN_PROGRESS:
                break
            joined = await self.join(member_id, metadata, session_timeout_ms)
            if joined.error_code != _NO_ERROR or joined.leader_id != member_id:
                break
        await self.leave(member_id)
        return Release(False, "the group could not be formed to release its leader", member_id)
