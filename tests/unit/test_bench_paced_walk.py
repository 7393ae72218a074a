"""The staff-pages benchmark's load model (bench/scenarios/console_pages.py, issue 18): people who read
a page before the next click, and the services' own times read from their latency histograms."""

from __future__ import annotations

import random
import statistics

from bench.scenarios.console_pages import (
    STAFF,
    THINK_MIN_S,
    paced_seconds,
    served_summary,
    think_time,
)


def test_think_times_average_two_seconds_and_never_fall_under_half_a_second() -> None:
    rng = random.Random(7)
    times = [think_time(rng) for _ in range(50_000)]

    assert min(times) >= THINK_MIN_S
    assert 1.95 < statistics.fmean(times) < 2.05
    # Seeded: every run offers the same load.
    assert think_time(random.Random(7)) == times[0]


def test_the_paced_walk_lasts_long_enough_for_the_samples_asked() -> None:
    seconds = paced_seconds(page_types=10, samples=100)

    # Each of the staff opens one page per think time (2 s mean) plus its answer.
    pages_per_type = seconds * STAFF / 2.2 / 10
    assert pages_per_type >= 100


def test_served_summary_reads_the_requests_between_two_scrapes() -> None:
    inf = float("inf")
    before = {"certification": {0.1: 10.0, 0.25: 20.0, 0.5: 20.0, inf: 20.0}}
    after = {"certification": {0.1: 100.0, 0.25: 180.0, 0.5: 195.0, inf: 200.0},
             "subsidy": {0.1: 0.0, 0.25: 0.0, 0.5: 0.0, inf: 0.0}}

    # 180 requests since: 160 within 250 ms, 175 within 500 ms (so p95, the 171st, is in that bucket).
    assert served_summary(before, after) == "certification 180 requests, p95 ≤ 500 ms, 20 took 250 ms or more"
