"""Report a trip to Nichiiki over HTTP: sign in with client credentials, then ``POST /v1/redemptions``.

For partners that do not write to Kafka (docs/partners.md, "Reporting trips"):

1. signs in at the identity provider with the OAuth 2.0 client credentials grant (your client id,
   ``partner-<code>``, and its secret), finding the token endpoint in the provider's discovery
   document ``<issuer>/.well-known/openid-configuration``. The token lasts 15 minutes: keep it and
   reuse it until shortly before it expires (sign-ins are rate limited: 10 a minute per client);
2. reports the trip to the subsidy service with the token: ``POST /v1/redemptions``. The answer is the
   outcome at once: ``201`` for a new trip id (``accepted`` true, or false with a ``reason``), ``200``
   with ``duplicate: true`` and the first outcome when the same trip comes again; a problem
   (``application/problem+json``) when the report cannot be yours (``unknown-grant``, 404), reuses a
   trip id with other details (``duplicate-trip``, 409) or is malformed (``invalid-request``, 422).
   ``429``/``503`` are waited out (``Retry-After``).

The same outcome also arrives on your feed (a grant record ``redeemed`` or ``redemption_rejected``).
Against the local stack of ``./nichiiki start`` (development credentials, docs/identity.md)::

    .venv/bin/python -m examples.partners.report_trip_http --client-id partner-jal \\
        --client-secret nichiiki-dev-jal-secret --grant-id <grant id> --certificate <certificate number>

====================  ==============================  ================================
option                environment variable            default
====================  ==============================  ================================
``--issuer``          ``PARTNER_OIDC_ISSUER``         ``http://127.0.0.1:8107``
``--subsidy``         ``PARTNER_SUBSIDY_URL``         ``http://127.0.0.1:8103``
``--client-id``       ``PARTNER_CLIENT_ID``           (required)
``--client-secret``   ``PARTNER_CLIENT_SECRET``       (required)
``--scope``           ``PARTNER_OAUTH_SCOPE``         none (Entra ID: ``api://<app>/.default``)
====================  ==============================  ================================

It needs only ``httpx`` (``pip install httpx``) and is one file: copy it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import httpx

log = logging.getLogger("nichiiki.partner.report_trip_http")

JAPAN = timezone(timedelta(hours=9))
#: A token this close to its expiry is replaced before it is used.
REFRESH_MARGIN_S = 60.0


class ReportError(RuntimeError):
    """The provider or the service refused: the status, the code and what it said."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass
class ClientCredentials:
    """Your OAuth client at the identity provider, and the access token it holds."""

    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    access_token: str = field(default="", repr=False)
    expires_at: float = 0.0
    token_endpoint: str | None = None

    def token(self, client: httpx.Client) -> str:
        """A live access token: the one held, else a new one (client credentials have no refresh token)."""
        if self.access_token and self.expires_at - time.monotonic() > REFRESH_MARGIN_S:
            return self.access_token
        if self.token_endpoint is None:
            discovery = _answer(client.get(self.issuer.rstrip("/") + "/.well-known/openid-configuration"))
            self.token_endpoint = str(discovery["token_endpoint"])
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        # client_secret_basic (RFC 6749 §2.3.1); the provider takes client_id/client_secret in the form too
        body = _answer(_post(client, self.token_endpoint, data=form, auth=(self.client_id, self.client_secret)))
        self.access_token = str(body["access_token"])
        self.expires_at = time.monotonic() + float(body.get("expires_in", 300))
        return self.access_token


def _post(client: httpx.Client, url: str, *, patience_s: float = 60.0, **kwargs: Any) -> httpx.Response:
    """POST, waiting out 429 and 503 answers for as long as ``Retry-After`` says (at most ``patience_s``)."""
    deadline = time.monotonic() + patience_s
    while True:
        response = client.post(url, **kwargs)
        if response.status_code not in (429, 503) or time.monotonic() > deadline:
            return response
        pause = float(response.headers.get("Retry-After", "1"))
        log.info("%s answered %s; retrying in %s s", url, response.status_code, pause)
        time.sleep(pause)


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.is_success:
        body: dict[str, Any] = response.json()
        return body
    try:
        problem = response.json()
    except ValueError:
        raise ReportError(response.status_code, "http-error", response.text[:200]) from None
    # OAuth errors are {"error", "error_description"}; the services' are problem+json {"code", "detail"}.
    code = problem.get("code") or problem.get("error") or "error"
    detail = problem.get("detail") or problem.get("error_description") or problem.get("title") or ""
    raise ReportError(response.status_code, str(code), str(detail))


def trip_body(
    grant_id: str, certificate_number: str, *, trip_id: str | None = None, trip_kind: str = "round_trip",
    travelled_on: date | None = None, discount_jpy: int | None = None,
) -> dict[str, Any]:
    """The body of ``POST /v1/redemptions``: ``TripReported`` minus ``partner`` (your token says who)."""
    body: dict[str, Any] = {
        "grant_id": grant_id,
        "certificate_number": certificate_number,
        "trip_id": trip_id or f"trip-{uuid.uuid4().hex[:12]}",  # yours, unique: the platform deduplicates by it
        "trip_kind": trip_kind,
        "travelled_on": (travelled_on or datetime.now(JAPAN).date()).isoformat(),
        "reported_at": datetime.now(UTC).isoformat(),
    }
    if discount_jpy is not None:
        body["discount_jpy"] = discount_jpy
    return body


def report_trip(
    client: httpx.Client, credentials: ClientCredentials, subsidy_url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Report one trip; the status (201 new, 200 a repeat) and the outcome."""
    token = credentials.token(client)
    response = _post(client, subsidy_url.rstrip("/") + "/v1/redemptions", json=body,
                     headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 401 and credentials.access_token:
        credentials.access_token = ""  # e.g. the provider rotated its keys: sign in again, once
        response = _post(client, subsidy_url.rstrip("/") + "/v1/redemptions", json=body,
                         headers={"Authorization": f"Bearer {credentials.token(client)}"})
    return response.status_code, _answer(response)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--issuer", default=env("PARTNER_OIDC_ISSUER", "http://127.0.0.1:8107"))
    parser.add_argument("--subsidy", default=env("PARTNER_SUBSIDY_URL", "http://127.0.0.1:8103"))
    parser.add_argument("--client-id", default=env("PARTNER_CLIENT_ID"))
    parser.add_argument("--client-secret", default=env("PARTNER_CLIENT_SECRET"))
    parser.add_argument("--scope", default=env("PARTNER_OAUTH_SCOPE"))
    parser.add_argument("--grant-id", required=True)
    parser.add_argument("--certificate", required=True, help="the certificate number the grant is for")
    parser.add_argument("--trip-id", default=None, help="your unique trip id (default: a random one)")
    parser.add_argument("--kind", default="round_trip", choices=["one_way", "round_trip"])
    parser.add_argument("--travelled-on", type=date.fromisoformat, default=None, help="default: today in Japan")
    parser.add_argument("--discount-jpy", type=int, default=None, help="fare_discount programmes only")
    args = parser.parse_args(argv)
    if not args.client_id or not args.client_secret:
        parser.error("--client-id and --client-secret (or PARTNER_CLIENT_ID/PARTNER_CLIENT_SECRET) are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    credentials = ClientCredentials(args.issuer, args.client_id, args.client_secret, args.scope)
    body = trip_body(args.grant_id, args.certificate, trip_id=args.trip_id, trip_kind=args.kind,
                     travelled_on=args.travelled_on, discount_jpy=args.discount_jpy)
    with httpx.Client(timeout=15.0) as client:
        try:
            status, outcome = report_trip(client, credentials, args.subsidy, body)
        except ReportError as error:
            sys.stderr.write(f"refused: {error}\n")
            return 1
    sys.stdout.write(f"{status} trip {body['trip_id']}: {json.dumps(outcome, ensure_ascii=False)}\n")
    return 0 if outcome.get("accepted") else 2


if __name__ == "__main__":
    sys.exit(main())
