"""Composition root of the partner gateway: runtime, consumers, cache sync, HTTP routes.

Start order: migrations and the partner seed (before any consumer runs, so no event meets an
empty partner table), the Redis client, then the kit runtime (relay, consumers) and the cache
sync task, which first rebuilds Redis from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
from fastapi import FastAPI
from prometheus_client import Counter
from starlette.middleware import Middleware

from services.partner_gateway import api, feed
from services.partner_gateway.auth import ApiKeyCache
from services.partner_gateway.cache import REDIS_STATE, VerificationCache, open_redis, sync_verification_cache
from services.partner_gateway.consumers import build_router, build_trips_router
from services.partner_gateway.export import EXPORT_TABLES
from services.partner_gateway.handlers import (
    SERVICE,
    Gateway,
    PartnerDirectory,
    partner_topics,
    seed_partners,
    trip_topics,
)
from shared.contracts.topics import CERTIFICATES, EXPORT_REQUESTS, GRANTS, RESIDENTS
from shared.kit.consumer import EventRouter
from shared.kit.data_export import export_router
from shared.kit.http import create_app as create_service_app
from shared.kit.kafka_admin import ensure_topics
from shared.kit.service import BackgroundTask, ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

MIGRATIONS = Path(__file__).parent / "migrations"
TRIPS_CONSUMER = f"{SERVICE}-trips"
#: Idle, the feed's consumer rests at most this long (the others 400 ms): measured with 400, the first
#: certificates after a quiet spell reached a partner up to 0.55 s late (docs/benchmarks.md).
FEED_IDLE_REST_MAX_S = 0.1
#: How often the gateway checks that the brokers still have every known partner's topics.
PARTNER_TOPICS_CHECK_S = 10.0

log = structlog.get_logger(__name__)

DESCRIPTION = """\
What airlines, railways and ferries may see of certified dual residents: a consented feed per
partner (`partner.<code>.v1`, Kafka), on-demand certificate verification, and the record of every
delivery (APPI Art. 29). Each partner's trip reports (`partner.<code>.trips.v1`) are forwarded to
the subsidy service as that partner's. Partners authenticate with an `X-Api-Key` the gateway issues
or a bearer JWT with role `partner`.
"""


def create_app(
    settings: Settings | None = None, *, partner_topics_check_s: float = PARTNER_TOPICS_CHECK_S
) -> FastAPI:
    settings = settings or get_settings()
    partners = PartnerDirectory()
    feed_signal = feed.FeedSignal()
    runtime = ServiceRuntime(
        SERVICE,
        migrations=MIGRATIONS,
        consumers=[
            ConsumerSpec(
                EventRouter.combined(build_router(partners), export_router(SERVICE, EXPORT_TABLES)),
                [RESIDENTS, CERTIFICATES, GRANTS, EXPORT_REQUESTS],
                idle_rest_max_s=FEED_IDLE_REST_MAX_S,  # the feeds' lag is a target (issue #5)
            ),
            # The bridge: every partner's trips, read on the partner-facing cluster, forwarded inside.
            # The topics are those of the partners known at each (re)subscription: a partner
            # registered at run time is read once the runtime re-subscribes (``on_new`` below).
            ConsumerSpec(
                build_trips_router(partners), [], name=TRIPS_CONSUMER, cluster="edge",
                topics_of=lambda: trip_topics(p.code for p in partners),
            ),
        ],
        prepare=[lambda rt: load_partners(rt, partners)],
        # feed.watch: wakes the HTTP feed's long polls, reloads partners registered on other replicas.
        background=[
            sync_verification_cache, feed.watch(partners, feed_signal),
            watch_partner_topics(partners, lambda: resubscribe_trips(runtime), partner_topics_check_s),
        ],
        settings=settings,
        edge=True,  # the feeds go out to the partner-facing cluster (the relay sends them by topic)
    )
    # A partner registered here (after its commit), or learnt from another replica (reload, an
    # event naming it): the kit's watchdog re-subscribes the trips consumer, now with its topic.
    partners.on_new = lambda codes: resubscribe_trips(runtime, codes)
    verification = VerificationCache(runtime)
    runtime.state["verification"] = verification
    gateway = Gateway(runtime, partners, ApiKeyCache(runtime, generations=verification), verification, feed=feed_signal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.state[REDIS_STATE] = open_redis(settings)
        try:
            async with runtime.lifespan(app):
                # Everything made at start-up (modules, models, clients: most of the heap) out of the
                # collector's sight: each full collection walked all of it, about a tenth of the
                # verification hot path's CPU (profiled) and its slowest answers.
                gc.collect()
                gc.freeze()
                yield
        finally:
            verification.close()
            client = runtime.state.pop(REDIS_STATE, None)
            if client is not None:
                await client.aclose()

    app = create_service_app(
        service=SERVICE, settings=settings, routers=[api.router], lifespan=lifespan,
        readiness=runtime.readiness, description=DESCRIPTION,
        hot_paths=[Middleware(api.VerificationHotPath, gateway=gateway)],
    )
    app.state.gateway = gateway
    verification.lookups = Counter(
        "partner_gateway_verifications_total", "Certificate verifications by where the answer came from",
        ["source"], registry=app.state.metrics_registry,
    )
    return app


async def load_partners(runtime: ServiceRuntime, partners: PartnerDirectory) -> None:
    """Seed the partners (idempotent) before the consumers that route by them start: the trips
    consumer's first subscription reads their trip topics."""
    async with runtime.pool.acquire() as conn:
        partners.replace(await seed_partners(conn))


def resubscribe_trips(runtime: ServiceRuntime, codes: list[str] | None = None) -> None:
    """Flag the trips consumer: the runtime's watchdog re-subscribes it (within ~2 s), asking its
    topics again. Before the consumers exist (the start's first load) there is nothing to flag."""
    for consumer in runtime.consumers:
        if consumer.name == TRIPS_CONSUMER:
            log.info("trips consumer to re-subscribe", partners=codes)
            consumer.needs_resubscribe = True


def watch_partner_topics(
    partners: PartnerDirectory, recreated: Callable[[], None], interval_s: float
) -> BackgroundTask:
    """Every ``interval_s``: create any topic of a known partner that is missing (feed and trips on
    the edge, its trips' dead letters inside): an embedded broker that restarted lost them, and the
    kit's watchdog recreates only the registry's topics (registered partners are in no registry) and
    only when the internal cluster lost its own; then have the trips consumer re-subscribe."""

    async def partner_topics_check(runtime: ServiceRuntime) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                created = await ensure_topics(runtime.settings, partner_topics(p.code for p in partners))
            except Exception as error:
                log.info("broker not reachable from the partner topics check", error=repr(error))
                continue
            if created:
                log.warning("partner topics the broker had lost were recreated", topics=created)
                recreated()

    return partner_topics_check
