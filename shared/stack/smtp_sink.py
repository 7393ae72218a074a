"""A local SMTP sink for development and tests: every accepted message becomes an ``.eml`` file.

The sink answers on ``127.0.0.1:<port>``, accepts any sender, any recipient and any credentials
(AUTH PLAIN/LOGIN is advertised without TLS, but not required), and writes each message to
``<dir>/<UTC timestamp>-<uuid>.eml`` — atomically, so another process can read the mailbox
(:func:`read_mailbox`) while the sink runs. The envelope is recorded in two headers prepended to
the message: ``X-Envelope-From`` and ``X-Envelope-To`` (Bcc recipients only appear there).

Fault knobs, for tests of the mailer's retry logic: :meth:`SmtpSink.fail_next` (temporary 4xx
answers) and :meth:`SmtpSink.reject_address` (a permanent 550 for one recipient).

Run standalone (the platform launcher does this)::

    python -m shared.stack.smtp_sink --dir .state/mail --port 2525
"""

from __future__ import annotations

import argparse
import email.policy
import signal
import threading
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import structlog

from shared.stack.ports import LOCALHOST, free_port

__all__ = ["SmtpSink", "read_mailbox", "run_smtp_sink"]

log = structlog.get_logger(__name__)

_SUFFIX = ".eml"


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=email.policy.default).parsebytes(raw)


def read_mailbox(dir: Path) -> list[EmailMessage]:
    """Every message stored by a sink in ``dir``, oldest first (an absent folder is an empty mailbox)."""
    folder = Path(dir)
    if not folder.is_dir():
        return []
    return [_parse(path.read_bytes()) for path in sorted(folder.glob(f"*{_SUFFIX}"))]


class _Handler:
    """aiosmtpd handler: the fault knobs and the mailbox writer (runs in the controller's thread)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.fail_budget = 0
        self.fail_code = 451
        self.rejected: set[str] = set()
        self.received: list[EmailMessage] = []

    def _injected_failure(self) -> str | None:
        with self.lock:
            if self.fail_budget <= 0:
                return None
            self.fail_budget -= 1
            code = self.fail_code
        detail = "4.3.0 Temporary failure" if code < 500 else "5.3.0 Permanent failure"
        return f"{code} {detail} (injected by the SMTP sink)"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:
        with self.lock:
            rejected = address.strip().lower() in self.rejected
        if rejected:
            log.info("smtp_sink.rejected", rcpt=address)
            return "550 5.1.1 Recipient address rejected (SMTP sink)"
        failure = self._injected_failure()
        if failure is not None:
            log.info("smtp_sink.injected_failure", stage="RCPT", rcpt=address, answer=failure)
            return failure
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        failure = self._injected_failure()
        if failure is not None:
            log.info("smtp_sink.injected_failure", stage="DATA", answer=failure)
            return failure
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", errors="surrogateescape")
        headers = (
            f"X-Envelope-From: {envelope.mail_from or ''}\r\nX-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode("utf-8", errors="surrogateescape")
        raw = headers + bytes(content)
        message_id = uuid.uuid4().hex
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{stamp}-{message_id}{_SUFFIX}"
        partial = self.directory / f".{final.name}.part"
        partial.write_bytes(raw)
        partial.replace(final)  # atomic: readers never see half a message
        parsed = _parse(raw)
        with self.lock:
            self.received.append(parsed)
        log.info(
            "smtp_sink.accepted",
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            subject=parsed.get("Subject"),
            file=final.name,
        )
        return f"250 2.0.0 OK: queued as {message_id}"


def _accept_any_credentials(*_args: Any, **_kwargs: Any) -> Any:
    from aiosmtpd.smtp import AuthResult

    return AuthResult(success=True)


class SmtpSink:
    """An SMTP server on ``127.0.0.1:<port>`` (a thread of this process) storing mail in ``directory``."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self._directory = Path(directory).absolute()
        self._port = port if port is not None else free_port()
        self._handler = _Handler(self._directory)
        self._controller: Any = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (a no-op when already started); returns once the server answers."""
        if self._controller is not None:
            return
        from aiosmtpd.controller import Controller

        self._directory.mkdir(parents=True, exist_ok=True)
        controller = Controller(
            self._handler,
            hostname=LOCALHOST,
            port=self._port,
            server_hostname="nichiiki-smtp-sink",  # avoids a (possibly slow) getfqdn()
            authenticator=_accept_any_credentials,
            auth_require_tls=False,
        )
        try:
            controller.start()
        except BaseException:
            controller.stop(no_assert=True)
            if not controller.loop.is_closed():
                controller.loop.close()
            raise
        self._controller = controller
        log.info("smtp_sink.started", url=self.url, directory=str(self._directory))

    def stop(self) -> None:
        if self._controller is None:
            return
        self._controller.stop()
        self._controller = None
        log.info("smtp_sink.stopped", url=self.url)

    def is_running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SmtpSink {self.url} {'running' if self.is_running() else 'stopped'} {self._directory}>"

    # -- addresses and mailbox ---------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def url(self) -> str:
        """``smtp://127.0.0.1:PORT``."""
        return f"smtp://{LOCALHOST}:{self._port}"

    @property
    def directory(self) -> Path:
        return self._directory

    def messages(self) -> list[EmailMessage]:
        """Every message in the mailbox folder, oldest first (includes earlier runs' messages)."""
        return read_mailbox(self._directory)

    @property
    def received(self) -> list[EmailMessage]:
        """The messages accepted by *this* sink object since it was created (in memory)."""
        with self._handler.lock:
            return list(self._handler.received)

    def clear(self) -> None:
        """Empty the mailbox folder and the in-memory list."""
        with self._handler.lock:
            self._handler.received.clear()
        for path in self._directory.glob(f"*{_SUFFIX}"):
            path.unlink(missing_ok=True)

    # -- fault knobs -------------------------------------------------------------------------

    def fail_next(self, n: int, code: int = 451) -> None:
        """The next ``n`` RCPT/DATA commands (each counts as one) are answered ``code``, not accepted."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if not 400 <= code <= 599:
            raise ValueError(f"an SMTP failure code is 4xx or 5xx, got {code}")
        with self._handler.lock:
            self._handler.fail_budget = n
            self._handler.fail_code = code

    def reject_address(self, addr: str) -> None:
        """RCPT TO ``addr`` (case-insensitive) is answered ``550`` from now on."""
        with self._handler.lock:
            self._handler.rejected.add(addr.strip().lower())

    def clear_faults(self) -> None:
        """Forget :meth:`fail_next` and :meth:`reject_address`."""
        with self._handler.lock:
            self._handler.fail_budget = 0
            self._handler.rejected.clear()


def run_smtp_sink(dir: Path, port: int) -> None:
    """Run a sink in the foreground until SIGTERM or SIGINT (main thread only: it installs handlers)."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("smtp_sink.signal", signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with SmtpSink(dir, port):
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.stack.smtp_sink",
        description="Local SMTP sink: stores every accepted message as an .eml file.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="mailbox folder (created if missing)")
    parser.add_argument("--port", type=int, default=2525, help="TCP port on 127.0.0.1 (default 2525)")
    args = parser.parse_args(argv)
    run_smtp_sink(args.dir, args.port)


if __name__ == "__main__":
    main()
