"""Scale-out (issue 22): the write paths with 2 processes of each service against 1, same machine.

The same two loads run twice, back to back: first on the fleet as the other scenarios find it (one
process per service), then with ``NICHIIKI_HTTP_WORKERS=2`` for the writing services (registration,
donation) and every service that consumes their topics.

- Registration, sustained maximum: closed-loop clients each POST a basic registration and wait for
  its ResidentRegistered on the topic (end to end, as in the registration scenario).
- Donation, spread: closed-loop confirmed donations over every municipality without a travel program
  (as the donation scenario's spread window).

Each HTTP worker of a service is a whole runtime (``shared.kit.service.serve``): it serves requests
and runs the service's consumers, in the service's one consumer group, so 2 workers are also 2
consumer replicas (the group splits the topic's partitions between them), and one outbox relay per
database is elected among them (an advisory lock). The figures are on the same 2 cores as the
services, the backends and the load generator, so they show what a second process buys when the
machine is the limit, not what a second machine would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.kit import services_with_env
from bench.measure import LoadResult, saturate, saturate_for
from bench.scenarios import _events
from bench.scenarios._common import CLIENT, OUTSIDE, CpuMeter
from bench.scenarios._http import (
    HttpPool,
    LoopLag,
    TopicWatcher,
    cpu_note,
    create_accounts,
    idle_cpu,
    new_resident_ids,
    settle,
    subject_of,
    wait_consumers_caught_up,
)
from bench.scenarios.donation import Donations, confirm_all, spread_municipalities
from bench.scenarios.registration import Registrations
from shared.contracts.registration import ResidentRegistered
from shared.contracts.topics import DONATIONS, RESIDENTS

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult

#: It restarts services: ``bench.run`` runs it after the scenarios that do not.
RESHAPES_FLEET = True
WORKERS = 2
#: Closed-loop clients: enough to keep both configurations busy (queueing shows in the latency).
REGISTRATION_CLIENTS = 64
DONATION_CLIENTS = 32
WARM = 100
#: The services run with 2 processes: the writers and every consumer of what they write.
WRITERS = ("registration", "donation")
WRITTEN = (RESIDENTS, DONATIONS)
#: Both workers of a service leave their groups together when it stops, which on the embedded broker
#: leaves a departed leader in the group (shared/kit/group_join.py): the next member is kept out until
#: the runtime releases it, after this long (30 s by default). Groups here form within 5 s (a 4 s session).
RESTARTED = {"NICHIIKI_CONSUMER_JOIN_TIMEOUT_MS": "10000"}


@dataclass
class Window:
    """One timed load: its result, where the CPU went, and how late the load generator's loop ran."""

    load: LoadResult
    cpu: dict[str, float]
    wall: float
    lag: LoopLag

    @property
    def client_cores(self) -> float:
        return self.cpu.get(CLIENT, 0.0) / self.wall if self.wall else 0.0

    def platform_ms(self) -> float:
        """CPU per operation of the services and backends (not the load generator), all of it: a second
        process's idle polling is part of what scaling out costs."""
        spent = sum(value for group, value in self.cpu.items() if group not in (CLIENT, OUTSIDE))
        return spent / max(1, self.load.completed) * 1000


@dataclass
class Shape:
    """One configuration's two windows."""

    label: str
    workers: dict[str, int]
    idle: dict[str, float]
    registration: Window
    donation: Window
    load_average: str


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    scaled = [name for name in dict.fromkeys([*WRITERS, *(s for t in WRITTEN for s in t.consumers)])
              if name in ctx.fleet.processes]
    seconds = ctx.scale(10, 3)
    #: At most this many operations per window (the registrations' accounts are made beforehand).
    burst = ctx.scale(5_000, 800)
    donations = ctx.scale(10_000, 1_500)
    per_shape = WARM + burst
    ids = new_resident_ids(2 * per_shape)
    codes = spread_municipalities()

    # Set-up for both shapes, outside every timed window: the accounts, their tokens, the requests' bytes.
    setup_http = HttpPool(ctx.fleet.url("registration"), size=64)
    try:
        await create_accounts(ctx, setup_http, ids, concurrency=32)
    finally:
        await setup_http.close()
    watcher = TopicWatcher(ctx.settings, ctx.settings.topic(RESIDENTS.name), subject_of(ResidentRegistered.event_type))
    registrations = Registrations.of(ctx, setup_http, watcher, ids)
    admin = ctx.headers("admin")

    async def measure(label: str, first: int, workers: dict[str, int]) -> Shape:
        # New connections for each shape: the services behind the ports were restarted.
        registrations.http = HttpPool(ctx.fleet.url("registration"), size=256)
        donation_http = _events.LeanHttp(ctx.fleet.url("donation"), size=DONATION_CLIENTS)
        donate = Donations(donation_http, admin)
        warm_donations = [donate.request(f"w{i}", codes[-1 - i % 50], i) for i in range(WARM)]
        spread = [donate.request(f"s{i}", codes[i % len(codes)], i) for i in range(donations)]

        async def register(index: int) -> None:
            await registrations.register(index)

        async def donate_spread(index: int) -> None:
            await _confirmed(donation_http, spread[index])

        try:
            # Warm-up (connections, pools, caches, the groups' assignments after the restart), not reported.
            await saturate(lambda i: register(first + i), total=WARM, concurrency=16)
            await confirm_all(donation_http, warm_donations, concurrency=16)
            await quiet(ctx)
            idle = await idle_cpu()

            base = first + WARM
            registration = await window(lambda i: register(base + i), seconds, burst, REGISTRATION_CLIENTS)
            await quiet(ctx)
            donation = await window(donate_spread, seconds, donations, DONATION_CLIENTS)
            await quiet(ctx)
        finally:
            await registrations.http.close()
            await donation_http.close()
        return Shape(label, workers, idle, registration, donation, _events.machine_load())

    await watcher.start()
    try:
        one = await measure("1 process each", 0, {})
        two_env = {name: {"NICHIIKI_HTTP_WORKERS": str(WORKERS)} for name in scaled}
        async with services_with_env(ctx.fleet, two_env, restarted=RESTARTED) as reshape:
            two = await measure(f"{WORKERS} processes each", per_shape, dict.fromkeys(scaled, WORKERS))
    finally:
        await watcher.stop()

    reg_ratio = _ratio(two.registration.load, one.registration.load)
    don_ratio = _ratio(two.donation.load, one.donation.load)
    notes = [
        f"{WORKERS} processes each (NICHIIKI_HTTP_WORKERS={WORKERS}): {', '.join(scaled)} — the writers and every "
        "consumer of registration.residents.v1 and donation.donations.v1. Each worker serves HTTP and runs the "
        "service's consumers in its one consumer group (the 4 partitions of each topic split 2 + 2), so 2 workers "
        "are 2 consumer replicas; one outbox relay per database is elected among them. "
        f"Restarting them (all at once, each until ready) took {reshape.there.describe()}, back to one process "
        f"each afterwards {reshape.back.describe() if reshape.back else '?'}; both restarts with a 10 s consumer join "
        "timeout (not 30 s), as a service's two workers stopping together leave a departed group leader on the "
        "embedded broker.",
    ]
    for shape in (one, two):
        for what, win, unit in (("registration", shape.registration, "registration"),
                                ("donation spread", shape.donation, "donation")):
            notes.append(
                f"{shape.label}, {what}: {win.load.completed:,} in {win.load.seconds:.1f} s = {win.load.rate:,.0f}/s, "
                f"{win.load.errors} errors, per operation p50 {win.load.latencies.p50:.1f} ms, p99 "
                f"{win.load.latencies.p99:.1f} ms; {win.lag.note()}. "
                + cpu_note(win.cpu, win.wall, max(1, win.load.completed), unit, shape.idle, shape.workers)
            )
        idle = ", ".join(f"{group} {cores:.2f}" for group, cores in sorted(shape.idle.items(), key=lambda i: -i[1])
                         if cores >= 0.01 and group not in (CLIENT, OUTSIDE))
        notes.append(
            f"{shape.label}: with no load offered (2 s before the windows) the platform used "
            f"{_platform_cores(shape.idle):.2f} cores: {idle}; {shape.load_average} after its windows (the machine "
            "is shared)."
        )
    client_ms = max(_client_ms(one.registration, one.idle), _client_ms(two.registration, two.idle))
    notes.append(
        f"Load generator (this process: the HTTP clients and the topic watcher, one event loop): "
        f"{one.registration.client_cores:.2f} → {two.registration.client_cores:.2f} cores during the registration "
        f"maximum, {one.donation.client_cores:.2f} → {two.donation.client_cores:.2f} cores during the donations; "
        f"{_client_ms(one.registration, one.idle):.2f} / {_client_ms(two.registration, two.idle):.2f} ms per "
        f"registration over its idle use ({one.idle.get(CLIENT, 0.0):.2f} cores: the watcher's fetches, the memory "
        f"sampler), so its one core would drive about {1000 / max(client_ms, 1e-3):,.0f} registrations/s end to end: "
        "not what limits these windows while its loop runs on time (the lag above)."
    )
    notes.append(
        f"Each window {seconds} s of closed loop (no operation started after it; at most {burst:,} registrations, "
        f"{donations:,} donations): registrations by {REGISTRATION_CLIENTS} clients, each waiting for its event "
        f"before the next; donations spread over {len(codes):,} municipalities by {DONATION_CLIENTS} clients. "
        f"{WARM} of each before every shape's windows (not timed); "
        f"{len(ids):,} accounts created beforehand. The platform was left to settle before each window."
    )
    return ScenarioResult(
        f"Scale-out: 1 process against {WORKERS} of the writing services and their consumers, same machine",
        [
            Metric("registrations/s, maximum (end to end), 1 process each", one.registration.load.rate, "/s",
                   limit="pg_commit_1_conn"),
            Metric(f"registrations/s, maximum (end to end), {WORKERS} processes each", two.registration.load.rate,
                   "/s", limit="pg_commit_1_conn"),
            Metric(f"registrations/s, {WORKERS}:1 ratio", reg_ratio, "×"),
            Metric("platform CPU per registration, 1 process each", one.registration.platform_ms(), "ms"),
            Metric(f"platform CPU per registration, {WORKERS} processes each",
                   two.registration.platform_ms(), "ms"),
            Metric("donations/s spread, 1 process each", one.donation.load.rate, "/s", limit="pg_commit_1_conn"),
            Metric(f"donations/s spread, {WORKERS} processes each", two.donation.load.rate, "/s",
                   limit="pg_commit_1_conn"),
            Metric(f"donations/s, {WORKERS}:1 ratio", don_ratio, "×"),
            Metric("platform CPU per donation, 1 process each", one.donation.platform_ms(), "ms"),
            Metric(f"platform CPU per donation, {WORKERS} processes each", two.donation.platform_ms(), "ms"),
            Metric("platform CPU with no load offered, 1 process each", _platform_cores(one.idle), "cores"),
            Metric(f"platform CPU with no load offered, {WORKERS} processes each", _platform_cores(two.idle),
                   "cores"),
        ],
        notes,
    )


async def window(operation: Callable[[int], Awaitable[None]], seconds: float, limit: int, clients: int) -> Window:
    meter = CpuMeter()
    with LoopLag() as lag:
        load = await saturate_for(operation, seconds=seconds, concurrency=clients, limit=limit)
    cpu = meter.stop()
    return Window(load, cpu, meter.wall, lag)


async def quiet(ctx: BenchContext) -> None:
    """Consumers caught up, e-mails sent, outboxes relayed: one window's aftermath is not the next one's."""
    for topic in WRITTEN:
        await wait_consumers_caught_up(ctx, topic)
    await settle(ctx)
    await _events.settle(ctx)


async def _confirmed(http: _events.LeanHttp, request: bytes) -> None:
    status, _ = await http.send(request)
    if status != 201:
        raise _events.HttpStatusError(status, b"expected a new donation")


def _ratio(scaled: LoadResult, single: LoadResult) -> float:
    return scaled.rate / single.rate if single.rate else 0.0


def _client_ms(win: Window, idle: Mapping[str, float]) -> float:
    """The load generator's CPU per operation over what it spends idle."""
    added = win.cpu.get(CLIENT, 0.0) - idle.get(CLIENT, 0.0) * win.wall
    return max(0.0, added) / max(1, win.load.completed) * 1000


def _platform_cores(idle: Mapping[str, float]) -> float:
    return sum(cores for group, cores in idle.items() if group not in (CLIENT, OUTSIDE))
