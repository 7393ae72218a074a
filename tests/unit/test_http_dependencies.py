"""No route of any service runs a plain ``def`` on the request path: FastAPI would run it in its
thread pool, a thread hop per request (about a tenth of a busy service's CPU, profiled)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from services.certification.main import create_app as certification_app
from services.donation.main import create_app as donation_app
from services.identity.main import create_app as identity_app
from services.insights.main import create_app as insights_app
from services.listings.main import create_app as listings_app
from services.notification.main import create_app as notification_app
from services.partner_gateway.main import create_app as gateway_app
from services.planning.main import create_app as planning_app
from services.registration.main import create_app as registration_app
from services.subsidy.main import create_app as subsidy_app
from shared.kit.settings import Settings

APPS: dict[str, Callable[..., FastAPI]] = {
    "registration": registration_app, "certification": certification_app, "subsidy": subsidy_app,
    "donation": donation_app, "notification": notification_app, "partner_gateway": gateway_app,
    "identity": identity_app, "planning": planning_app, "insights": insights_app, "listings": listings_app,
}


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, those of included routers too."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:
            yield from api_routes(router.routes)


def calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from calls(sub)


@pytest.mark.parametrize("service", sorted(APPS))
def test_every_endpoint_and_dependency_is_async(service: str) -> None:
    # Building an app connects to nothing: a DSN that is never dialled will do.
    app = APPS[service](Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0"))
    routes = list(api_routes(app.routes))
    assert routes
    sync = {
        f"{route.path}: {getattr(call, '__qualname__', type(call).__qualname__)}"
        for route in routes for call in calls(route.dependant)
        # a dependency may be an object with an async __call__ (FastAPI's security schemes)
        if not (inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__))
    }
    assert sync == set()
