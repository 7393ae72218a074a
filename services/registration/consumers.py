"""What the service consumes: ``gateway.partners.v1`` (partners registered through the partner
gateway) into its partner list, so that a resident may consent to share their certificate with a
partner registered after the seed (``PARTNER_CODES``).

Thin: a run of registrations is applied in one statement in the consumer's transaction (the inbox
has claimed the events, so a redelivery never gets here).
"""

from __future__ import annotations

import structlog

from services.registration import store
from services.registration.domain import latest_partner_registrations
from shared.contracts.partners import PartnerRegistered
from shared.kit.consumer import EventRouter, Run

log = structlog.get_logger(__name__)

router = EventRouter()


@router.on_many(PartnerRegistered)
async def partners_registered(run: Run[PartnerRegistered]) -> None:
    latest = latest_partner_registrations(event for _, event in run)
    await store.save_registered_partners(run.conn, [(e.code, e.name, e.registered_at) for e in latest])
    log.info("registered partners recorded", partners=sorted(e.code for e in latest))
