"""Every HTTP write of every service goes through the kit's use-case runner, and every one is
covered by a test of its Idempotency-Key scoping.

A write route takes the ``WriteRequest`` dependency (``shared.kit.use_case.write_request``): it is
the only way to get a ``Write``, whose ``run`` authorises first, scopes the key to the caller,
runs one transaction with transient retries and writes the outbox. A route added without it fails
here; so does one that ``tests/integration/test_<service>_write_keys.py`` does not list in its
``COVERED`` operations.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest

from shared.kit.settings import Settings
from shared.kit.use_case import write_request
from tests.unit.test_http_dependencies import APPS, api_routes, calls

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
#: OAuth 2.0 protocol endpoints: form-encoded, authenticated by their own parameters (client secret,
#: password, refresh token) and answered in OAuth's error format; repeating one is the protocol's
#: business (a spent refresh token revokes its session), not an Idempotency-Key's.
PROTOCOL_ENDPOINTS = {"identity": {"POST /oauth/token", "POST /oauth/revoke"}}


def write_operations(service: str) -> Iterator[tuple[str, bool]]:
    """Each write route of the service as ``METHOD /path``, with whether it takes a ``Write``."""
    app = APPS[service](Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0"))
    for route in api_routes(app.routes):
        for method in sorted((route.methods or set()) & WRITE_METHODS):
            yield f"{method} {route.path}", write_request in set(calls(route.dependant))


def covered_operations(service: str) -> set[str]:
    """The operations ``tests/integration/test_<service>_write_keys.py`` exercises (its ``COVERED``)."""
    try:
        module = importlib.import_module(f"tests.integration.test_{service}_write_keys")
    except ModuleNotFoundError:
        return set()
    return set(module.COVERED)


@pytest.mark.parametrize("service", sorted(APPS))
def test_every_write_route_runs_through_the_use_case_runner(service: str) -> None:
    operations = dict(write_operations(service))
    assert operations, f"{service} has no write route"
    assert {op for op, runs in operations.items() if not runs} == PROTOCOL_ENDPOINTS.get(service, set())


@pytest.mark.parametrize("service", sorted(APPS))
def test_every_write_route_has_its_key_scoping_tested(service: str) -> None:
    operations = {op for op, _ in write_operations(service)} - PROTOCOL_ENDPOINTS.get(service, set())
    assert operations - covered_operations(service) == set()


def test_a_front_writes_nothing_of_its_own() -> None:
    """The console (a front, ``FRONTS``) is not in ``APPS``: it has no database and no runtime, so
    there is no write of its own to run through the use-case runner. Each of its forms calls a
    service's write route (listed above, with its ``Idempotency-Key`` made when the form was shown)
    and is CSRF-checked (tests/unit/test_console_pages.py)."""
    from services.console.main import create_app as console_app
    from shared.contracts.topics import FRONTS

    assert set(FRONTS).isdisjoint(APPS)
    app = console_app(Settings(redis_url="redis://127.0.0.1:1/0", env="development"))
    assert not hasattr(app.state, "runtime")
    posts = [route for route in api_routes(app.routes) if "POST" in (route.methods or set())]
    assert posts and all(write_request not in set(calls(route.dependant)) for route in posts)
