"""E-mail over SMTP: one connection per batch, standard-library ``smtplib`` in a worker thread.

``NICHIIKI_SMTP_URL`` is ``smtp://[user:password@]host[:port]`` (optionally ``?starttls=true``)
or ``smtps://...`` for implicit TLS. Every message carries a ``Message-ID`` derived from its
e-mail row (``<row-id@nichiiki.jp>``), so if a crash makes the sender send a row twice, the
copies are recognisably the same message (and mail clients collapse them).
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, formataddr
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from services.notification.domain import SmtpStage, is_permanent_smtp_failure

MESSAGE_ID_DOMAIN = "nichiiki.jp"


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout_s: float = 10.0


def parse_smtp_url(url: str, timeout_s: float = 10.0) -> SmtpTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError(f"NICHIIKI_SMTP_URL must be smtp://host[:port] or smtps://host[:port], got {url!r}")
    implicit_tls = parts.scheme == "smtps"
    query = parse_qs(parts.query)
    starttls = query.get("starttls", ["false"])[0].lower() in ("1", "true", "yes")
    return SmtpTarget(
        host=parts.hostname,
        port=parts.port or (465 if implicit_tls else 25),
        implicit_tls=implicit_tls,
        starttls=starttls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        timeout_s=timeout_s,
    )


def message_id(row_id: str) -> str:
    return f"<{row_id}@{MESSAGE_ID_DOMAIN}>"


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    row_id: str
    sender: str
    recipient: str
    recipient_name: str | None
    subject: str
    body: str
    language: str
    kind: str
    source_event_id: str

    def to_message(self) -> EmailMessage:
        message = EmailMessage()
        message["Message-ID"] = message_id(self.row_id)
        message["Date"] = format_datetime(datetime.now(UTC))
        message["From"] = self.sender
        message["To"] = formataddr((self.recipient_name or "", self.recipient))
        message["Subject"] = self.subject
        message["Auto-Submitted"] = "auto-generated"
        message["X-Nichiiki-Template"] = self.kind
        message["X-Nichiiki-Source-Event"] = self.source_event_id
        # base64: safe through any server (no 8BITMIME needed) and no ">From" mangling of lines.
        message.set_content(self.body, charset="utf-8", cte="base64")
        message["Content-Language"] = self.language  # after set_content, which resets Content-* headers
        return message


@dataclass(frozen=True, slots=True)
class Accepted:
    outcome: Literal["accepted"] = "accepted"


@dataclass(frozen=True, slots=True)
class Refused:
    """The server or the network said no; ``permanent`` says whether trying again can help."""

    stage: SmtpStage
    code: int | None
    reason: str

    @property
    def permanent(self) -> bool:
        return is_permanent_smtp_failure(self.stage, self.code)


SendOutcome = Accepted | Refused


class SmtpConnection:
    """One SMTP session; each call runs in a worker thread so the event loop never blocks."""

    def __init__(self, target: SmtpTarget) -> None:
        self.target = target
        self._smtp: smtplib.SMTP | None = None

    async def open(self) -> Refused | None:
        """Connect (and log in); a Refused at stage 'connect' when the server cannot be reached."""
        try:
            self._smtp = await asyncio.to_thread(self._connect)
        except smtplib.SMTPResponseException as error:
            return Refused("connect", error.smtp_code, _text(error.smtp_code, error.smtp_error))
        except (OSError, smtplib.SMTPException) as error:
            return Refused("connect", None, f"{type(error).__name__}: {error}")
        return None

    async def send(self, email: OutgoingEmail) -> SendOutcome:
        if self._smtp is None:
            refused = await self.open()
            if refused is not None:
                return refused
        return await asyncio.to_thread(self._send, email)

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            await asyncio.to_thread(_quit, smtp)

    def _connect(self) -> smtplib.SMTP:
        t = self.target
        smtp: smtplib.SMTP
        if t.implicit_tls:
            smtp = smtplib.SMTP_SSL(t.host, t.port, timeout=t.timeout_s, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(t.host, t.port, timeout=t.timeout_s, local_hostname="nichiiki-notification")
        try:
            smtp.ehlo()
            if t.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if t.username is not None:
                smtp.login(t.username, t.password or "")
        except BaseException:
            _quit(smtp)
            raise
        return smtp

    def _send(self, email: OutgoingEmail) -> SendOutcome:
        smtp = self._smtp
        assert smtp is not None
        try:
            raw = email.to_message().as_bytes(policy=SMTP_POLICY)
            smtp.sendmail(email.sender, [email.recipient], raw)
        except smtplib.SMTPRecipientsRefused as error:
            code, text = next(iter(error.recipients.values()), (None, b""))
            return Refused("rcpt", code, _text(code, text))
        except smtplib.SMTPSenderRefused as error:
            return Refused("mail", error.smtp_code, _text(error.smtp_code, error.smtp_error))
        except smtplib.SMTPDataError as error:
            return Refused("data", error.smtp_code, _text(error.smtp_code, error.smtp_error))
        except smtplib.SMTPResponseException as error:
            self._drop()
            return Refused("mail", error.smtp_code, _text(error.smtp_code, error.smtp_error))
        except (OSError, smtplib.SMTPException) as error:  # disconnected, timed out, reset
            self._drop()
            return Refused("connect", None, f"{type(error).__name__}: {error}")
        return Accepted()

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def _text(code: int | None, message: bytes | str) -> str:
    text = message.decode("utf-8", errors="replace") if isinstance(message, bytes) else message
    return f"{code} {text}".strip() if code is not None else text
