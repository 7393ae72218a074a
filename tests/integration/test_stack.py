"""The embedded local stack: each server really starts, serves, survives kill/restart and leaves no process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared.stack import EmbeddedBroker, EmbeddedPostgres, EmbeddedRedis, SmtpSink, read_mailbox
from shared.stack.ports import free_port, wait_for_port

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tree(pid: int | None) -> list[psutil.Process]:
    assert pid is not None
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _assert_gone(procs: list[psutil.Process]) -> None:
    """Every process has exited (a zombie waiting for init to reap it counts as exited)."""
    for proc in procs:
        try:
            status = proc.status()
        except psutil.NoSuchProcess:
            continue
        assert status == psutil.STATUS_ZOMBIE, f"process {proc.pid} ({proc.name()}) is still {status}"


# -- ports -----------------------------------------------------------------------------------


def test_wait_for_port_times_out_with_a_clear_message() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_port("127.0.0.1", port, timeout=0.2)
    assert time.monotonic() - started < 2


# -- broker ----------------------------------------------------------------------------------


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _consume_one(bootstrap: str, topic: str) -> bytes:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="stack-test",
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(15):
            record = await consumer.getone()
    finally:
        await consumer.stop()
    value: bytes = record.value
    return value


async def test_broker_produce_consume_kill_restart(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    started = time.monotonic()
    broker.start()  # synchronous, even from a coroutine: the readiness probe runs in a helper thread
    assert time.monotonic() - started < 5
    try:
        assert broker.is_running()
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        await _create_topic(broker.bootstrap, "stack.test")
        await _produce(broker.bootstrap, "stack.test", b"hello")
        assert await _consume_one(broker.bootstrap, "stack.test") == b"hello"

        procs = _tree(broker.pid)
        port = broker.port
        broker.kill()
        assert not broker.is_running()
        assert broker.pid is None
        _assert_gone(procs)

        broker.start()  # same port; memory storage: the topic is gone
        assert broker.port == port
        await _create_topic(broker.bootstrap, "stack.test")
        await _produce(broker.bootstrap, "stack.test", b"again")
        assert await _consume_one(broker.bootstrap, "stack.test") == b"again"

        broker.restart()
        assert broker.is_running()
    finally:
        procs = _tree(broker.pid) if broker.is_running() else []
        broker.stop()
    _assert_gone(procs)
    assert not broker.is_running()


def test_broker_context_manager_and_port_conflict() -> None:
    with EmbeddedBroker() as broker:
        procs = _tree(broker.pid)
        with pytest.raises(RuntimeError, match="already in use"):
            EmbeddedBroker(port=broker.port).start()
    _assert_gone(procs)


# -- postgres --------------------------------------------------------------------------------


async def _pg_execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _pg_fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def test_postgres_init_restart_keeps_data_and_stop_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg" / "data"
    pg = EmbeddedPostgres(data_dir, log_path=tmp_path / "pg.log")
    started = time.monotonic()
    pg.start()
    assert time.monotonic() - started < 30
    try:
        assert (data_dir / "PG_VERSION").exists()
        assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        asyncio.run(_pg_execute(pg.dsn, "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x')"))

        port, first_pid = pg.port, pg.pid
        pg.restart()
        assert pg.port == port and pg.pid != first_pid
        rows = asyncio.run(_pg_fetch(pg.dsn, "SELECT id, v FROM t"))
        assert [tuple(r) for r in rows] == [(1, "x")]

        # A crash: SIGKILL the postmaster and its backends; committed data survives (crash recovery).
        asyncio.run(_pg_execute(pg.dsn, "INSERT INTO t VALUES (2, 'y')"))
        procs = _tree(pg.pid)
        assert len(procs) > 1  # the postmaster forks its auxiliary processes
        pg.kill()
        _assert_gone(procs)
        assert not (data_dir / "postmaster.pid").exists() or not pg.is_running()
        pg.start()  # removes the stale postmaster.pid
        rows = asyncio.run(_pg_fetch(pg.dsn, "SELECT id FROM t ORDER BY id"))
        assert [r["id"] for r in rows] == [1, 2]
        socket_dir = pg.socket_dir
        assert socket_dir is not None and (socket_dir / f".s.PGSQL.{pg.port}").exists()
    finally:
        procs = _tree(pg.pid) if pg.is_running() else []
        pg.stop()
    _assert_gone(procs)
    assert not pg.is_running()
    assert socket_dir is not None and not socket_dir.exists()
    assert not (data_dir / "postmaster.pid").exists()


def test_postgres_takes_over_a_cluster_left_running(tmp_path: Path) -> None:
    """A postgres orphaned by a crashed run (still running on the data dir) is stopped, not fought with."""
    data_dir = tmp_path / "data"
    first = EmbeddedPostgres(data_dir)
    first.start()
    orphan = _tree(first.pid)
    second = EmbeddedPostgres(data_dir)
    try:
        second.start()
        _assert_gone(orphan)
        rows = asyncio.run(_pg_fetch(second.dsn, "SELECT 1 AS one"))
        assert rows[0]["one"] == 1
    finally:
        first.stop()  # already gone: a no-op that reaps
        second.stop()


# -- redis -----------------------------------------------------------------------------------


def test_redis_set_get_kill_restart_stop(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", log_path=tmp_path / "redis.log") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            assert client.get("k") == b"v"
            procs = _tree(server.pid)
            server.kill()
            _assert_gone(procs)
            server.start()
            assert client.get("k") is None  # no persistence, by design
            client.set("k", "w")
            assert client.get("k") == b"w"
        finally:
            client.close()
        procs = _tree(server.pid)
    _assert_gone(procs)
    assert not server.is_running()
    assert not any((tmp_path / "redis").glob("*.rdb"))


# -- smtp sink -------------------------------------------------------------------------------


def _mail(to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "noreply@nichiiki.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("こんにちは — body")
    return msg


def test_smtp_sink_stores_messages_and_injects_faults(tmp_path: Path) -> None:
    mailbox = tmp_path / "mail"
    with SmtpSink(mailbox) as sink:
        assert sink.url == f"smtp://127.0.0.1:{sink.port}"
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.send_message(_mail("taro@example.jp", "first"))

        sink.fail_next(1)
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.send_message(_mail("hanako@example.jp", "retried"))
            assert refused.value.recipients["hanako@example.jp"][0] == 451
            client.rset()
            client.send_message(_mail("hanako@example.jp", "retried"))  # the retry goes through

        sink.reject_address("Nobody@Example.jp")
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as rejected:
                client.send_message(_mail("nobody@example.jp", "bounced"))
            assert rejected.value.recipients["nobody@example.jp"][0] == 550

        messages = sink.messages()
        assert [m["Subject"] for m in messages] == ["first", "retried"]
        assert [m["Subject"] for m in sink.received] == ["first", "retried"]
        assert messages[1]["X-Envelope-To"] == "hanako@example.jp"
        assert "こんにちは" in messages[0].get_content()
    assert not sink.is_running()
    files = sorted(p.name for p in mailbox.iterdir())
    assert len(files) == 2 and all(name.endswith(".eml") for name in files)
    assert [m["Subject"] for m in read_mailbox(mailbox)] == ["first", "retried"]


def test_smtp_sink_fail_next_counts_rcpt_and_data(tmp_path: Path) -> None:
    with SmtpSink(tmp_path) as sink:
        sink.fail_next(1)
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo()
            assert client.mail("noreply@nichiiki.test")[0] == 250
            assert client.rcpt("a@example.jp")[0] == 451  # the injected failure, at RCPT
            assert client.rcpt("a@example.jp")[0] == 250  # used up
            sink.fail_next(1, code=452)
            code, _ = client.data(_mail("a@example.jp", "x").as_bytes())
            assert code == 452  # an injected failure at DATA
            client.rset()
            client.send_message(_mail("a@example.jp", "x"))
        assert len(sink.messages()) == 1
        with pytest.raises(ValueError):
            sink.fail_next(1, code=250)


def test_smtp_sink_runs_as_a_child_process_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    mailbox = tmp_path / "mail"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.stack.smtp_sink", "--dir", str(mailbox), "--port", str(port)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=15, process=proc, name="smtp sink")
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.login("any", "thing")  # any credentials are accepted
            client.send_message(_mail("jiro@example.jp", "from a child"))
        assert [m["Subject"] for m in read_mailbox(mailbox)] == ["from a child"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


# -- a terminal's Ctrl-C -------------------------------------------------------------------------

#: A launcher as ``nichiiki start`` is one: it handles SIGINT itself (this one by doing nothing) and stops
#: its servers when told to (here a line on stdin; ``nichiiki start`` after its services). Prints each
#: server's pid once ready.
_LAUNCHER = """
import signal, sys
from pathlib import Path
from shared.stack import EmbeddedBroker, EmbeddedPostgres, EmbeddedRedis
signal.signal(signal.SIGINT, lambda *_: None)  # a handler, not SIG_IGN: that one a child would inherit
base = Path(sys.argv[1])
servers = [EmbeddedPostgres(base / "pg"), EmbeddedBroker(), EmbeddedRedis(base / "redis")]
for server in servers:
    server.start()
print("pids", *(server.pid for server in servers), flush=True)
sys.stdin.readline()
for server in reversed(servers):
    server.stop()
"""


def test_a_terminals_ctrl_c_reaches_the_launcher_not_its_servers(tmp_path: Path) -> None:
    """A terminal sends Ctrl-C's SIGINT to its foreground process group: the launcher's. The servers
    run in sessions of their own, so they keep serving while the launcher stops the services that
    drain into them; the launcher stops them after."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(tmp_path)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, start_new_session=True,  # its own group, as a terminal's foreground job
    )
    assert launcher.stdin is not None and launcher.stdout is not None
    pids: list[int] = []
    tree: list[psutil.Process] = []
    try:
        for line in launcher.stdout:  # the servers' start-up logs come first
            if line.startswith(b"pids "):
                pids = [int(pid) for pid in line.split()[1:]]
                break
        assert len(pids) == 3, "the launcher did not start its servers"
        tree = _tree(launcher.pid)
        os.killpg(launcher.pid, signal.SIGINT)
        time.sleep(1.0)  # PostgreSQL's fast shutdown and redis-server's take well under that
        for pid in pids:
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            assert os.getpgid(pid) != launcher.pid
        launcher.stdin.write(b"stop\n")
        launcher.stdin.flush()
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:  # a failure above: leave no server behind
            tree = tree or _tree(launcher.pid)
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            launcher.wait(timeout=10)
    _assert_gone(tree)
