"""Events in: a resident's erasure closes their account here too (``ResidentErased``).

The account's e-mail is its user name, so the account itself is personal data: it is deleted with
its sessions, refresh tokens and failed sign-ins (foreign keys cascade), so no token can be
refreshed (an access token lives out its few minutes and finds nothing left), and stored write
answers about it are forgotten. Staff and other accounts are never touched by a resident's erasure.
"""

from __future__ import annotations

import structlog

from shared.contracts.registration import ResidentErased
from shared.kit.consumer import EventRouter, HandlerContext
from shared.kit.erasure import forget_responses_about, record_erased

log = structlog.get_logger(__name__)

router = EventRouter()


@router.on(ResidentErased)
async def close_account(ctx: HandlerContext, event: ResidentErased) -> None:
    await record_erased(ctx.conn, event.resident_id, event.withdrawn_at)
    deleted = await ctx.conn.fetchval(
        "WITH gone AS (DELETE FROM accounts WHERE account_id = $1 AND role = 'resident' RETURNING 1) "
        "SELECT count(*) FROM gone",
        event.resident_id,
    )
    forgotten = await forget_responses_about(ctx.conn, event.resident_id)
    log.info("resident account closed", resident_id=event.resident_id, deleted=deleted, responses_forgotten=forgotten)
