"""A partner's HTTP feed client for Nichiiki (no Kafka): follow ``GET /v1/feed`` with a cursor and long polls.

What it does (docs/partners.md, "The HTTP feed"):

1. reads your feed from the partner gateway page by page, from the cursor ``0`` (or ``--after``, or the
   cursor saved in ``--cursor-file`` by an earlier run), each request waiting up to ``--wait`` seconds
   for a record when there is none (a long poll);
2. keeps, per record key, the latest state in a dict (certificates under their number, grants under
   ``<certificate number>/grants/<grant id>``); a ``partner.withdrawal`` or a tombstone (``value``
   null) forgets: the certificate and all its grants, or the one grant;
3. saves the cursor after every page (``--cursor-file``), waits out ``429`` answers (``Retry-After``),
   and stops after ``--follow`` seconds (0: once it has read everything there is), printing a summary.

The partner is your API key's (``X-Api-Key``): you read your own feed, never another's. Against the
local stack of ``./nichiiki start`` (the gateway at http://127.0.0.1:8106; an admin issues the key with
``POST /v1/partners/jal/api-keys``)::

    PARTNER_API_KEY=nchk_... .venv/bin/python -m examples.partners.http_feed --follow 30

=====================  ============================  ===========================
option                 environment variable          default
=====================  ============================  ===========================
``--gateway``          ``PARTNER_GATEWAY_URL``       ``http://127.0.0.1:8106``
``--api-key``          ``PARTNER_API_KEY``           (required)
``--after``                                          ``0`` or the saved cursor
``--cursor-file``      ``PARTNER_CURSOR_FILE``       none (start from ``--after``)
``--wait``                                           ``20`` seconds (at most 25)
``--follow``                                         ``0`` (stop when caught up)
=====================  ============================  ===========================

4. opens each member number (sealed for you: docs/partners.md, "Member numbers") with the key of
   ``GET /v1/keys/{kid}``, kept while the certificate is and dropped when you are told to forget it.

It needs ``httpx`` and ``cryptography`` (``pip install httpx cryptography``) and is one file: copy it.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("nichiiki.partner.http_feed")

CERTIFICATE = "jp.nichiiki.partner.certificate.v2"
GRANT = "jp.nichiiki.partner.grant.v2"
WITHDRAWAL = "jp.nichiiki.partner.withdrawal.v1"
GRANT_KEY_INFIX = "/grants/"
#: The gateway answers a long poll after at most 25 s.
MAX_WAIT_S = 25.0
PAGE_SIZE = 500


def certificate_of_key(key: str) -> str:
    return key.split(GRANT_KEY_INFIX, 1)[0]


@dataclass
class FeedState:
    """What you may know now: the latest record of each key, nothing that was withdrawn."""

    certificates: dict[str, dict[str, Any]] = field(default_factory=dict)
    grants: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The cursor to ask for next: save it with your state, and start from it next time.
    cursor: str = "0"
    records: int = 0
    tombstones: int = 0
    withdrawals: int = 0

    def apply(self, record: dict[str, Any]) -> None:
        """One record of ``GET /v1/feed``: ``{cursor, key, value, type, id, time, subject}``."""
        self.records += 1
        key, value = str(record["key"]), record["value"]
        number = certificate_of_key(key)
        if value is None:  # a tombstone: forget the key (a certificate's: with its grants)
            self.tombstones += 1
            if GRANT_KEY_INFIX in key:
                self.grants.pop(key, None)
            else:
                self._forget(number)
        elif record["type"] == WITHDRAWAL:
            self.withdrawals += 1
            self._forget(number)
        elif record["type"] == CERTIFICATE:
            self.certificates[key] = value
        elif record["type"] == GRANT:
            self.grants[key] = value
        else:
            log.warning("record of an unknown type %r under key %s skipped", record["type"], key)
        self.cursor = str(record["cursor"])

    def _forget(self, number: str) -> None:
        self.certificates.pop(number, None)
        for key in [k for k in self.grants if certificate_of_key(k) == number]:
            del self.grants[key]

    def summary(self) -> str:
        lines = [
            f"{self.records} records read ({self.tombstones} tombstones, {self.withdrawals} withdrawals) up to "
            f"cursor {self.cursor}: {len(self.certificates)} certificates, {len(self.grants)} grants known now"
        ]
        for number, cert in sorted(self.certificates.items()):
            lines.append(f"  {number} {cert['status']} {cert['valid_from']}..{cert['valid_until']} "
                         f"resident_ref {str(cert['resident_ref'])[:12]}…")
            for key, grant in sorted(self.grants.items()):
                if certificate_of_key(key) == number:
                    lines.append(f"    grant {grant['grant_id']} {grant['state']}")
        return "\n".join(lines)


class FeedError(RuntimeError):
    """The gateway refused the request: the problem's code and detail (docs/partners.md, "Errors")."""


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class MemberNumbers:
    """Opens the member numbers sealed for you: the key of each resident (``kid``) from
    ``GET /v1/keys/{kid}``, kept in memory, dropped when you are told to forget them. A 404 means the
    resident withdrew or was erased: the number is gone for good (None)."""

    def __init__(self, client: httpx.Client, gateway_url: str, headers: dict[str, str]) -> None:
        self.client, self.url, self.headers = client, gateway_url.rstrip("/") + "/v1/keys/", headers
        self.keys: dict[str, bytes] = {}

    def open(self, sealed: dict[str, str] | None) -> str | None:
        if sealed is None:
            return None
        kid = sealed["kid"]
        key = self.keys.get(kid)
        if key is None:
            response = self.client.get(self.url + kid, headers=self.headers)
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise FeedError(_problem(response))
            key = self.keys[kid] = _unb64(response.json()["k"])
        return AESGCM(key).decrypt(_unb64(sealed["iv"]), _unb64(sealed["ct"]), kid.encode()).decode()

    def forget(self, resident_ref: str) -> None:
        for kid in [k for k in self.keys if k.endswith(":" + resident_ref)]:
            del self.keys[kid]


class HttpFeed:
    """Follows your feed with ``GET /v1/feed`` (an ``httpx.Client`` of your own may be passed in)."""

    def __init__(
        self, gateway_url: str, api_key: str, *, client: httpx.Client | None = None,
        cursor_file: Path | None = None, max_retry_s: float = 60.0,
    ) -> None:
        self.client = client or httpx.Client(timeout=httpx.Timeout(10.0, read=MAX_WAIT_S + 10.0))
        self.url = gateway_url.rstrip("/") + "/v1/feed"
        self.headers = {"X-Api-Key": api_key}
        self.cursor_file = cursor_file
        self.max_retry_s = max_retry_s
        self.state = FeedState()
        self.member_numbers = MemberNumbers(self.client, gateway_url, self.headers)
        if cursor_file is not None and cursor_file.exists():
            # A saved cursor goes with saved state: this example keeps its state in memory only, so a
            # real client stores both together (one transaction) and resumes from there.
            self.state.cursor = cursor_file.read_text().strip() or "0"

    def page(self, wait_s: float) -> list[dict[str, Any]]:
        """The next page after the cursor (waiting up to ``wait_s`` for one), applied to the state."""
        params: dict[str, str | int | float] = {"after": self.state.cursor, "limit": PAGE_SIZE,
                                                "wait": min(wait_s, MAX_WAIT_S)}
        retry_until = time.monotonic() + self.max_retry_s
        while True:
            response = self.client.get(self.url, params=params, headers=self.headers)
            if response.status_code in (429, 503) and time.monotonic() < retry_until:
                # Over your rate (429) or the gateway briefly unavailable (503): wait as told, then again.
                pause = float(response.headers.get("Retry-After", "1"))
                log.info("gateway answered %s; retrying in %s s", response.status_code, pause)
                time.sleep(pause)
                continue
            if response.status_code != 200:
                raise FeedError(_problem(response))
            break
        body = response.json()
        for record in body["records"]:
            value = record["value"]
            if value is not None and record["type"] in (CERTIFICATE, GRANT):
                # Kept opened in memory; a real client stores it as the personal data it is.
                value["member_number"] = self.member_numbers.open(value.get("member_number"))
            elif value is not None and record["type"] == WITHDRAWAL:
                self.member_numbers.forget(value["resident_ref"])  # the key is gone on the platform too
            self.state.apply(record)
        self.state.cursor = str(body["next"])
        if self.cursor_file is not None:
            self.cursor_file.write_text(self.state.cursor)
        records: list[dict[str, Any]] = body["records"]
        return records

    def follow(
        self, *, wait_s: float = 20.0, follow_s: float = 0.0, until: Callable[[FeedState], bool] | None = None,
    ) -> FeedState:
        """Read page after page: until caught up (an empty page) once ``follow_s`` has passed, or, with
        ``until``, until it holds (and at most ``follow_s``: then TimeoutError)."""
        deadline = time.monotonic() + follow_s
        while True:
            left = deadline - time.monotonic()
            if until is not None and until(self.state):
                return self.state
            records = self.page(wait_s=max(0.0, min(wait_s, left)))
            if until is None and not records and time.monotonic() >= deadline:
                return self.state
            if until is not None and not records and time.monotonic() >= deadline:
                raise TimeoutError(f"not seen within {follow_s:g} s; {self.state.records} records read")

    def close(self) -> None:
        self.client.close()


def _problem(response: httpx.Response) -> str:
    """``code: detail`` of an ``application/problem+json`` answer."""
    try:
        problem = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:200]}"
    return f"{response.status_code} {problem.get('code')}: {problem.get('detail') or problem.get('title')}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gateway", default=os.environ.get("PARTNER_GATEWAY_URL", "http://127.0.0.1:8106"))
    parser.add_argument("--api-key", default=os.environ.get("PARTNER_API_KEY"))
    parser.add_argument("--after", default=None, help="the cursor to read after (default 0 or the saved one)")
    parser.add_argument("--cursor-file", type=Path, default=os.environ.get("PARTNER_CURSOR_FILE"))
    parser.add_argument("--wait", type=float, default=20.0, help="long-poll seconds per request (≤ 25)")
    parser.add_argument("--follow", type=float, default=0.0, help="keep following for this many seconds")
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or PARTNER_API_KEY) is required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    feed = HttpFeed(args.gateway, args.api_key, cursor_file=args.cursor_file)
    if args.after is not None:
        feed.state.cursor = args.after
    try:
        state = feed.follow(wait_s=args.wait if args.follow else 0.0, follow_s=args.follow)
    except FeedError as error:
        sys.stderr.write(f"the gateway refused: {error}\n")
        return 1
    finally:
        feed.close()
    sys.stdout.write(state.summary() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
