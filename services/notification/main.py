"""Composition root: the runtime (database, consumers, outbox relay, e-mail sender) and the routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.notification.api import router
from services.notification.consumers import TOPICS
from services.notification.consumers import router as event_router
from services.notification.export import EXPORT_TABLES
from services.notification.sender import EmailSender, MailerConfig
from services.notification.templates import check_templates
from shared.contracts.topics import EXPORT_REQUESTS
from shared.kit.consumer import BACKGROUND_PACE_S, EventRouter
from shared.kit.data_export import export_router
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

SERVICE = "notification"


def create_app(settings: Settings | None = None, *, mailer: MailerConfig | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_templates()  # a broken template stops the start, not a delivery
    sender = EmailSender(mailer)
    runtime = ServiceRuntime(
        SERVICE,
        migrations=Path(__file__).parent / "migrations",
        consumers=[ConsumerSpec(
            EventRouter.combined(event_router, export_router("notification", EXPORT_TABLES)),
            [*TOPICS, EXPORT_REQUESTS], pace_s=BACKGROUND_PACE_S,
        )],
        background=[sender],
        settings=settings,
    )
    sender.bind(runtime)
    return create_http_app(
        service=SERVICE, settings=settings, routers=[router], lifespan=runtime.lifespan,
        readiness=runtime.readiness,
        description="Tells residents about every decision that concerns them: in-app inbox and e-mail.",
    )
