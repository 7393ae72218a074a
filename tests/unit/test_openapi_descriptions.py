"""Each service's OpenAPI page says what that service does, not how its main.py is wired."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
from fastapi import FastAPI

from shared.contracts.topics import SERVICES
from shared.kit.settings import Settings

#: A word the description of each service must use: what it is about.
WHAT_IT_DOES = {
    "registration": "registration",
    "certification": "certificate",
    "subsidy": "grants",
    "donation": "donations",
    "notification": "inbox",
    "partner_gateway": "partner",
    "identity": "sign",
    "planning": "plans",
    "insights": "kpis",
    "listings": "listings",
    "console": "pages",
}


@pytest.mark.parametrize("service", SERVICES)
def test_the_openapi_description_describes_the_service(service: str) -> None:
    main = importlib.import_module(f"services.{service}.main")
    create_app: Callable[[Settings], FastAPI] = main.create_app
    # Building an app connects to nothing: a DSN that is never dialled will do.
    app = create_app(Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0"))
    description = app.openapi()["info"]["description"]
    assert WHAT_IT_DOES[service] in description.lower()
    assert "composition root" not in description.lower() and "main.py" not in description
    assert description.strip() != (main.__doc__ or "").strip()
