"""The Kafka ACLs generated from the topic registry: each partner reaches its own two topics only, each
service exactly its work, nobody a wildcard; and the committed setup script is the generated one and runs."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.contracts import acls
from shared.contracts.acls import (
    DLQ_REPLAY_GROUP,
    OPS_PRINCIPAL,
    Binding,
    bindings,
    kafka_acls_commands,
    partner_principal,
    principals,
    service_principal,
    strimzi_acls,
    strimzi_kafka_user,
)
from shared.contracts.topics import (
    ALL_TOPICS,
    BACKENDS,
    FRONTS,
    PARTNER_CODES,
    SERVICES,
    Topic,
    dead_letter_topics,
    partner_feed,
    partner_trips,
)
from shared.kit import service as kit_service
from shared.kit.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "deploy" / "kafka" / "setup.sh"
FOUND = bindings()
PARTNER_TOPIC_NAMES = {t.name for code in PARTNER_CODES for t in (partner_feed(code), partner_trips(code))}


def _of(principal: str) -> set[Binding]:
    return {b for b in FOUND if b.principal == principal}


def _triples(found: set[Binding]) -> set[tuple[str, str, str, str]]:
    return {(b.resource_type, b.pattern, b.resource, b.operation) for b in found}


def test_every_binding_belongs_to_a_known_principal() -> None:
    assert {b.principal for b in FOUND} <= set(principals())
    assert len(set(principals())) == len(BACKENDS) + len(PARTNER_CODES) + 1


def test_no_wildcard_anywhere() -> None:
    for b in FOUND:
        assert "*" not in b.resource and "*" not in b.principal, b
        assert b.resource, b
        assert b.operation in ("READ", "WRITE", "DESCRIBE"), b  # no ALL, no CREATE, no ALTER
        assert b.resource_type in ("TOPIC", "GROUP"), b  # no CLUSTER-wide binding
        assert b.pattern == "LITERAL" or b.resource_type == "GROUP", b  # topics are named one by one


@pytest.mark.parametrize("code", PARTNER_CODES)
def test_a_partner_reaches_its_own_feed_and_trips_only(code: str) -> None:
    assert _triples(_of(partner_principal(code))) == {
        ("TOPIC", "LITERAL", f"partner.{code}.v1", "READ"),
        ("TOPIC", "LITERAL", f"partner.{code}.v1", "DESCRIBE"),
        ("TOPIC", "LITERAL", f"partner.{code}.trips.v1", "WRITE"),
        ("TOPIC", "LITERAL", f"partner.{code}.trips.v1", "DESCRIBE"),
        ("GROUP", "PREFIXED", f"{code}.", "READ"),
    }
    assert {b.cluster for b in _of(partner_principal(code))} == {"edge"}


def test_no_partner_reaches_a_non_partner_topic() -> None:
    partners = {partner_principal(code) for code in PARTNER_CODES}
    for b in FOUND:
        if b.principal in partners and b.resource_type == "TOPIC":
            assert b.resource in PARTNER_TOPIC_NAMES, b
            assert not b.resource.endswith(".dlq"), b


def test_no_two_partners_share_a_topic_or_a_group_prefix() -> None:
    groups = {b.resource for b in FOUND if b.resource_type == "GROUP"}
    for code in PARTNER_CODES:
        mine = _of(partner_principal(code))
        others = {b for other in PARTNER_CODES if other != code for b in _of(partner_principal(other))}
        assert not {b.resource for b in mine} & {b.resource for b in others}
        # a prefix that begins another's group (or a service's) would hand that group over
        prefix = f"{code}."
        assert not [g for g in groups if g != prefix and (g.startswith(prefix) or prefix.startswith(g))]


def test_group_prefixes_do_not_overlap() -> None:
    """``nichiiki.subsidy`` covers ``nichiiki.subsidy-trips``; no principal's prefix may cover another's groups."""
    owners: dict[str, set[str]] = {}
    for b in FOUND:
        if b.resource_type == "GROUP":
            owners.setdefault(b.resource, set()).add(b.principal)
    assert all(len(principals_) == 1 for principals_ in owners.values()), owners
    for prefix in owners:
        for other in owners:
            if prefix != other:
                assert not other.startswith(prefix), (prefix, other)


def test_only_the_gateway_among_services_has_edge_topics() -> None:
    for service in SERVICES:
        edge = {b.resource for b in _of(service_principal(service)) if b.cluster == "edge"}
        if service == "partner_gateway":
            assert edge == PARTNER_TOPIC_NAMES | {"nichiiki.partner_gateway"}
        else:
            assert not edge, service
            assert not {b.resource for b in _of(service_principal(service))} & PARTNER_TOPIC_NAMES, service


def _expected_service_bindings(service: str) -> set[tuple[str, str, str, str]]:
    """A service's work by the registry, worked out here independently of the generator."""
    out: set[tuple[str, str, str, str]] = set()
    for topic in ALL_TOPICS:
        if service in topic.producers:
            out |= {("TOPIC", "LITERAL", topic.name, "WRITE"), ("TOPIC", "LITERAL", topic.name, "DESCRIBE")}
        if service in topic.consumers:
            out |= {("TOPIC", "LITERAL", topic.name, "READ"), ("TOPIC", "LITERAL", topic.name, "DESCRIBE")}
            out |= {("TOPIC", "LITERAL", topic.dlq, "WRITE"), ("TOPIC", "LITERAL", topic.dlq, "DESCRIBE")}
            out.add(("GROUP", "PREFIXED", f"nichiiki.{service}", "READ"))
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_may_do_exactly_its_work(service: str) -> None:
    assert _triples(_of(service_principal(service))) == _expected_service_bindings(service)


@pytest.fixture(scope="module")
def runtimes() -> Iterator[dict[str, Any]]:
    """Each service's runtime as its composition root makes it (nothing started)."""
    made: list[Any] = []
    original = kit_service.ServiceRuntime.__init__

    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    settings = Settings(
        kafka_bootstrap="127.0.0.1:1", pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0",
        env="development", oidc_issuer="http://127.0.0.1:1",
    )
    found: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit_service.ServiceRuntime, "__init__", record)
        for service in BACKENDS:  # a front (the console) has no runtime and no Kafka client
            made.clear()
            importlib.import_module(f"services.{service}.main").create_app(settings)
            (found[service],) = made
    yield found


def test_a_front_has_no_kafka_user() -> None:
    assert all(service_principal(front) not in principals() for front in FRONTS)
    assert not [b for b in FOUND if any(b.principal == service_principal(front) for front in FRONTS)]


@pytest.mark.parametrize("service", BACKENDS)
def test_the_acls_cover_what_the_running_service_subscribes(service: str, runtimes: dict[str, Any]) -> None:
    """The composition roots, not only the registry: every group and topic a service's consumers use is allowed,
    on the cluster they use it on, and every topic the registry gives it is one a consumer of it reads."""
    runtime = runtimes[service]
    mine = _of(service_principal(service))
    group_prefixes = {(b.resource, b.cluster) for b in mine if b.resource_type == "GROUP" and b.operation == "READ"}
    readable = {(b.resource, b.cluster) for b in mine if b.operation == "READ" and b.resource_type == "TOPIC"}
    writable = {b.resource for b in mine if b.operation == "WRITE"}
    dynamic_clusters = set()  # consumers whose topics are found at start (the gateway's, one per partner)
    for spec in runtime.consumer_specs:
        group = f"nichiiki.{spec.name or service}"
        assert any(group.startswith(p) and c == spec.cluster for p, c in group_prefixes), (group, spec.cluster)
        if not spec.topics:
            dynamic_clusters.add(spec.cluster)
        for topic in spec.topics:
            assert (topic.name, spec.cluster) in readable, topic.name
            assert topic.dlq in writable, topic.dlq
    subscribed = {t.name for spec in runtime.consumer_specs for t in spec.topics}
    for name, cluster in readable:
        assert name in subscribed or cluster in dynamic_clusters, f"{service} may read {name} but never does"
    assert runtime.edge == (service == "partner_gateway")


def test_ops_replays_dead_letters_and_nothing_else() -> None:
    dlqs = {t.name for t in dead_letter_topics()}
    origins = {name.removesuffix(".dlq") for name in dlqs}
    assert _triples(_of(OPS_PRINCIPAL)) == (
        {("TOPIC", "LITERAL", name, op) for name in dlqs for op in ("READ", "DESCRIBE")}
        | {("TOPIC", "LITERAL", name, op) for name in origins for op in ("WRITE", "DESCRIBE")}
        | {("GROUP", "LITERAL", DLQ_REPLAY_GROUP, "READ")}
    )
    # That the replay keeps its progress in this group: tests/integration/test_consumer.py.


@pytest.mark.parametrize(("topic", "why"), [
    (Topic("partner.redemptions.v1", 4, "grant id", "partners", ("subsidy",), cluster="edge"), "neither"),
    (Topic("partner.jal.v1", 2, "key", "partner_gateway", ("jal",)), "internal cluster"),
])
def test_a_topic_the_rules_cannot_give_out_safely_is_refused(topic: Topic, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        bindings([topic])


def test_a_test_prefix_prefixes_topics_and_groups() -> None:
    prefixed = bindings(prefix="t1-")
    assert {b.resource[:3] for b in prefixed} == {"t1-"}
    assert len(prefixed) == len(FOUND)


def test_kafka_acls_commands_carry_every_binding() -> None:
    """Parsed back, the command lines give exactly the bindings (one cluster: all of them)."""
    parsed: set[tuple[str, str, str, str, str]] = set()
    for line in kafka_acls_commands(FOUND):
        words = line.split()
        assert words[:6] == ['"$BIN/kafka-acls.sh"', "--bootstrap-server", '"$BOOTSTRAP"', "--command-config",
                             '"$ADMIN_CONFIG"', "--add"]
        principal = words[words.index("--allow-principal") + 1]
        pattern = words[words.index("--resource-pattern-type") + 1].upper()
        ops = [words[i + 1].upper() for i, w in enumerate(words) if w == "--operation"]
        for i, w in enumerate(words):
            if w in ("--topic", "--group"):
                parsed |= {(principal, w[2:].upper(), pattern, words[i + 1], op) for op in ops}
    assert parsed == {(b.principal, b.resource_type, b.pattern, b.resource, b.operation) for b in FOUND}


def test_strimzi_kafka_user_acls() -> None:
    user = strimzi_kafka_user(FOUND, partner_principal("jal"), kafka_cluster="nichiiki-edge", cluster="edge")
    assert user["kind"] == "KafkaUser"
    assert user["metadata"] == {"name": "partner-jal", "labels": {"strimzi.io/cluster": "nichiiki-edge"}}
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    entries = user["spec"]["authorization"]["acls"]
    assert user["spec"]["authorization"]["type"] == "simple"
    assert sorted(entries, key=str) == sorted([
        {"resource": {"type": "group", "name": "jal.", "patternType": "prefix"}, "operations": ["Read"]},
        {"resource": {"type": "topic", "name": "partner.jal.trips.v1", "patternType": "literal"},
         "operations": ["Describe", "Write"]},
        {"resource": {"type": "topic", "name": "partner.jal.v1", "patternType": "literal"},
         "operations": ["Describe", "Read"]},
    ], key=str)
    # on the internal cluster a partner has no user rights at all; the gateway has on both
    assert strimzi_acls(FOUND, partner_principal("jal"), "internal") == []
    gateway = service_principal("partner_gateway")
    assert strimzi_acls(FOUND, gateway, "edge") and strimzi_acls(FOUND, gateway, "internal")
    assert strimzi_kafka_user(FOUND, gateway, kafka_cluster="k")["metadata"]["name"] == "svc-partner-gateway"


# --- the setup script -----------------------------------------------------------------------------------


def test_the_committed_setup_script_is_the_generated_one() -> None:
    assert SETUP.read_text(encoding="utf-8") == acls.setup_script(), (
        "deploy/kafka/setup.sh is stale: python -m shared.contracts.acls --script > deploy/kafka/setup.sh"
    )


@pytest.fixture
def fake_kafka_bin(tmp_path: Path) -> Path:
    """Stand-ins for the Kafka tools: each records its arguments, one call a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kafka-broker-api-versions.sh", "kafka-configs.sh", "kafka-topics.sh", "kafka-acls.sh"):
        script = bin_dir / tool
        script.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "{tmp_path}/calls"\n', encoding="utf-8")
        script.chmod(0o755)
    return bin_dir


def _run_setup(bin_dir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "KAFKA_BIN": str(bin_dir), "NICHIIKI_KAFKA_KEYSTORE_PASSWORD": "ks",
           **{acls.password_variable(p): f"pw{i}" for i, p in enumerate(principals())}, **extra}
    return subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_setup_script_creates_users_topics_and_acls(fake_kafka_bin: Path) -> None:
    done = _run_setup(fake_kafka_bin)
    assert done.returncode == 0, done.stderr
    calls = (fake_kafka_bin.parent / "calls").read_text(encoding="utf-8").splitlines()
    users = [c for c in calls if c.startswith("kafka-configs.sh")]
    assert len(users) == len(principals())
    for i, principal in enumerate(principals()):
        assert any(f"SCRAM-SHA-512=[iterations=8192,password=pw{i}]" in c
                   and c.endswith(f"--entity-name {acls.username(principal)}") for c in users), principal
    topics = {c.split("--topic ")[1].split()[0]: c for c in calls if c.startswith("kafka-topics.sh")}
    assert set(topics) == {t.name for t in (*ALL_TOPICS, *dead_letter_topics())}
    for name, call in topics.items():
        assert "--create --if-not-exists" in call and "--replication-factor 1" in call
        if name.startswith("partner.") and not name.endswith((".trips.v1", ".dlq")):
            # a tombstone outlives a partner offline for a week
            assert "cleanup.policy=compact" in call
            assert "delete.retention.ms=864000000" in call and 864_000_000 > 7 * 86_400_000
            assert "min.compaction.lag.ms=3600000" in call
        else:
            assert "cleanup.policy=compact" not in call or "gateway." in name
    assert len([c for c in calls if c.startswith("kafka-acls.sh")]) == len(kafka_acls_commands(FOUND))


def test_the_setup_script_refuses_a_missing_password_or_a_short_tombstone_life(fake_kafka_bin: Path) -> None:
    missing = _run_setup(fake_kafka_bin, NICHIIKI_KAFKA_PASSWORD_PARTNER_JAL="")
    assert missing.returncode != 0
    assert "NICHIIKI_KAFKA_PASSWORD_PARTNER_JAL is not set" in missing.stderr
    short = _run_setup(fake_kafka_bin, NICHIIKI_KAFKA_FEED_DELETE_RETENTION_MS=str(86_400_000))
    assert short.returncode != 0
    assert "under 7 days" in short.stderr
    odd = _run_setup(fake_kafka_bin, NICHIIKI_KAFKA_PASSWORD_OPS="a,b")
    assert odd.returncode != 0 and "may not contain" in odd.stderr


def test_env_template_gives_every_principal_a_password() -> None:
    lines = dict(line.split("=", 1) for line in acls.env_template().splitlines() if not line.startswith("#"))
    assert set(lines) == {"NICHIIKI_KAFKA_KEYSTORE_PASSWORD", *map(acls.password_variable, principals())}
    assert len(set(lines.values())) == len(lines) and all(len(v) >= 32 for v in lines.values())
