"""Notification's write under an Idempotency-Key: marking a message read is the resident's own
act; a repeat answers the first response to them only, another resident reusing the key is
refused, and a changed request under the same key is a 422. Who may act is checked first."""

from __future__ import annotations

import uuid

from shared.kit.settings import Settings
from tests.integration.test_notification import (
    messages_of,
    own_settings,
    publish,
    registered,
    resident_id,
    running,
    wait_for_rows,
)
from tests.support import assert_key_scoped, bearer
from tests.unit.test_notification_rendering import registration, sample_events

COVERED = {
    "POST /v1/residents/{resident_id}/notifications/{notification_id}/read",
}


async def test_a_read_key_is_the_residents_own_and_checked_after_who_may_act(settings: Settings) -> None:
    resident, other = resident_id(), resident_id()
    async with running(own_settings(settings, None)) as run:
        await registered(run, registration(resident, email_consent=False), registration(other, email_consent=False))
        await publish(run.settings, sample_events(resident)["application_received"])
        await wait_for_rows(run.pool, "SELECT count(*) FROM messages WHERE resident_id = $1", resident, count=2)
        mine = [row["id"] for row in await messages_of(run.pool, resident)]
        theirs = (await messages_of(run.pool, other))[0]["id"]
        me, them = bearer(run.settings, "resident", resident), bearer(run.settings, "resident", other)
        base = f"/v1/residents/{resident}/notifications"

        first = await assert_key_scoped(
            run.client, "POST", f"{base}/{mine[0]}/read", owner=me, other=them,
            changed_path=f"{base}/{mine[1]}/read",
        )
        assert first.json()["id"] == str(mine[0]) and first.json()["read_at"] is not None
        read = {row["id"]: row["read_at"] is not None for row in await messages_of(run.pool, resident)}
        assert read == {mine[0]: True, mine[1]: False}  # the refused changed request read nothing

        # Under the same key, a message that is not theirs is refused as such: never a replay, never a 422.
        key = {"Idempotency-Key": f"scope-{uuid.uuid4()}"}
        assert (await run.client.post(f"{base}/{mine[1]}/read", headers={**me, **key})).status_code == 200
        for path, status, code in (
            (f"{base}/{theirs}/read", 404, "notification-not-found"),
            (f"/v1/residents/{other}/notifications/{theirs}/read", 403, "other-residents-notifications"),
        ):
            response = await run.client.post(path, headers={**me, **key})
            assert (response.status_code, response.json()["code"]) == (status, code), response.text
            assert response.headers.get("Idempotent-Replayed") is None
        assert (await messages_of(run.pool, other))[0]["read_at"] is None
