"""Kafka ACLs of every principal, generated from the one topic registry (``shared.contracts.topics``).

For Apache Kafka deployments (the embedded broker has no authentication). Who may do what follows
from each topic's ``producer`` and ``consumers`` and nothing else:

- a service (``User:svc-<service>``): WRITE+DESCRIBE on the topics it produces; READ+DESCRIBE on the
  topics it consumes, WRITE+DESCRIBE on their dead-letter twins ``<topic>.dlq`` (it parks there) and
  READ on its consumer groups (prefix ``nichiiki.<service>``: ``nichiiki.<consumer name>``, see
  ``shared.kit.consumer``). No CREATE: in a deployment the setup job creates every topic.
- a partner (``User:partner-<code>``): READ+DESCRIBE on its feed ``partner.<code>.v1``, WRITE+DESCRIBE
  on its trips ``partner.<code>.trips.v1`` and READ on its groups (prefix ``<code>.``); nothing else.
- the operator (``User:ops``, ``nichiiki dlq replay``): READ+DESCRIBE on every dead-letter topic, READ
  on the replay group and WRITE+DESCRIBE on the topics dead letters go back to.

No wildcard anywhere (no ``*`` resource, no ``User:*``); super users are the broker's own and the
setup job's certificates, outside these bindings. Each binding names its cluster (``Topic.cluster``):
with a separate partner-facing cluster, the edge bindings go there. Renderers: ``kafka-acls.sh``
command lines (the setup script of docker-compose, ``deploy/kafka/setup.sh``) and Strimzi
``KafkaUser`` ACL entries (Kubernetes).

    python -m shared.contracts.acls --script > deploy/kafka/setup.sh   # the committed setup script
    python -m shared.contracts.acls --env >> .env                      # random passwords, once
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shared.contracts.topics import ALL_TOPICS, BACKENDS, PARTNER_CODES, Cluster, Topic, dead_letter_topics

Operation = Literal["READ", "WRITE", "DESCRIBE"]
ResourceType = Literal["TOPIC", "GROUP"]
PatternType = Literal["LITERAL", "PREFIXED"]

#: Every consumer group of a service is ``nichiiki.<consumer name>``, the name starting with the service's.
SERVICE_GROUP_PREFIX = "nichiiki."
#: The consumer group of ``nichiiki dlq replay`` (``shared.kit.dead_letters``).
DLQ_REPLAY_GROUP = "nichiiki.dlq-replay"
OPS_PRINCIPAL = "User:ops"
#: The mechanism of every SCRAM user the setup creates (the services' default ``..._SASL_MECHANISM``).
SCRAM_MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True, order=True, slots=True)
class Binding:
    """One ALLOW rule: ``principal`` may ``operation`` on the resource, on ``cluster``."""

    principal: str
    resource_type: ResourceType
    pattern: PatternType
    resource: str
    operation: Operation
    cluster: Cluster = "internal"


def service_principal(service: str) -> str:
    return f"User:svc-{service}"


def partner_principal(code: str) -> str:
    return f"User:partner-{code}"


def partner_group_prefix(code: str) -> str:
    return f"{code}."


def service_group_prefix(service: str) -> str:
    return f"{SERVICE_GROUP_PREFIX}{service}"


def username(principal: str) -> str:
    """The SCRAM user name of a principal (``User:svc-subsidy`` → ``svc-subsidy``)."""
    return principal.removeprefix("User:")


def password_variable(principal: str) -> str:
    """The environment variable holding a principal's SCRAM password (``NICHIIKI_KAFKA_PASSWORD_SVC_SUBSIDY``)."""
    return "NICHIIKI_KAFKA_PASSWORD_" + username(principal).upper().replace("-", "_").replace(".", "_")


def principals(services: Sequence[str] = BACKENDS, partners: Sequence[str] = PARTNER_CODES) -> tuple[str, ...]:
    """Every SCRAM user of the platform: each service (with ACLs or not: every one connects), each
    partner and the operator."""
    return (
        *(service_principal(s) for s in services), *(partner_principal(p) for p in partners), OPS_PRINCIPAL,
    )


def bindings(
    topics: Iterable[Topic] = ALL_TOPICS,
    *,
    services: Sequence[str] = BACKENDS,
    partners: Sequence[str] = PARTNER_CODES,
    prefix: str = "",
) -> tuple[Binding, ...]:
    """Every ALLOW binding of the platform, sorted, no duplicates. ``prefix``: a topic and group prefix
    (``NICHIIKI_TOPIC_PREFIX``), empty in a deployment.

    Raises ``ValueError`` for a topic the rules cannot give out safely: a writer or reader that is
    neither a service nor a partner (a topic shared by every partner), or a partner's topic inside."""
    out: set[Binding] = set()

    def party(topic: Topic, name: str) -> str:
        if name in services:
            return service_principal(name)
        if name in partners:
            if topic.cluster != "edge":
                raise ValueError(f"{topic.name}: partner {name} would reach the internal cluster")
            return partner_principal(name)
        raise ValueError(f"{topic.name}: {name!r} is neither a service nor a partner (one topic per partner)")

    def allow(principal: str, kind: ResourceType, pattern: PatternType, name: str, ops: Iterable[Operation],
              cluster: Cluster) -> None:
        out.update(Binding(principal, kind, pattern, name, op, cluster) for op in ops)

    for topic in topics:
        name = prefix + topic.name
        for producer in topic.producers:
            allow(party(topic, producer), "TOPIC", "LITERAL", name, ("WRITE", "DESCRIBE"), topic.cluster)
        for consumer in topic.consumers:
            principal = party(topic, consumer)
            allow(principal, "TOPIC", "LITERAL", name, ("READ", "DESCRIBE"), topic.cluster)
            if consumer in services:
                group = prefix + service_group_prefix(consumer)
                allow(principal, "GROUP", "PREFIXED", group, ("READ",), topic.cluster)
                # dead letters stay inside, whatever cluster the record came from
                allow(principal, "TOPIC", "LITERAL", prefix + topic.dlq, ("WRITE", "DESCRIBE"), "internal")
                allow(OPS_PRINCIPAL, "TOPIC", "LITERAL", prefix + topic.dlq, ("READ", "DESCRIBE"), "internal")
                allow(OPS_PRINCIPAL, "TOPIC", "LITERAL", name, ("WRITE", "DESCRIBE"), topic.cluster)
                allow(OPS_PRINCIPAL, "GROUP", "LITERAL", prefix + DLQ_REPLAY_GROUP, ("READ",), "internal")
            else:
                allow(principal, "GROUP", "PREFIXED", prefix + partner_group_prefix(consumer), ("READ",), topic.cluster)
    return tuple(sorted(out))


# --- renderers ------------------------------------------------------------------------------------------


def _grouped(found: Iterable[Binding]) -> dict[tuple[str, ResourceType, PatternType, tuple[Operation, ...]], list[str]]:
    """Resources by (principal, resource type, pattern, the operations they share): one command each."""
    ops: dict[tuple[str, ResourceType, PatternType, str], set[Operation]] = defaultdict(set)
    for b in found:
        ops[(b.principal, b.resource_type, b.pattern, b.resource)].add(b.operation)
    grouped: dict[tuple[str, ResourceType, PatternType, tuple[Operation, ...]], list[str]] = defaultdict(list)
    for (principal, kind, pattern, resource), operations in sorted(ops.items()):
        grouped[(principal, kind, pattern, tuple(sorted(operations)))].append(resource)
    return grouped


def kafka_acls_commands(
    found: Iterable[Binding], *, bootstrap: str = '"$BOOTSTRAP"', command_config: str = '"$ADMIN_CONFIG"',
    tool: str = '"$BIN/kafka-acls.sh"',
) -> list[str]:
    """``kafka-acls.sh --add`` command lines, one per principal, resource type, pattern and operation set
    (each starts a JVM: several resources per line)."""
    lines = []
    for (principal, kind, pattern, operations), resources in _grouped(found).items():
        parts = [tool, "--bootstrap-server", bootstrap, "--command-config", command_config, "--add",
                 "--allow-principal", principal]
        parts += [f"--operation {op.capitalize()}" for op in operations]
        parts += ["--resource-pattern-type", pattern.lower()]
        parts += [f"--{kind.lower()} {resource}" for resource in resources]
        lines.append(" ".join(parts))
    return lines


_STRIMZI_PATTERN = {"LITERAL": "literal", "PREFIXED": "prefix"}


def strimzi_acls(found: Iterable[Binding], principal: str, cluster: Cluster | None = None) -> list[dict[str, Any]]:
    """The ``spec.authorization.acls`` of the Strimzi ``KafkaUser`` of ``principal`` (``type: simple``),
    on ``cluster`` only when given."""
    chosen = [b for b in found if b.principal == principal and (cluster is None or b.cluster == cluster)]
    return [
        {
            # Strimzi's patternType is literal | prefix (Kafka's PREFIXED is refused by the CRD)
            "resource": {"type": kind.lower(), "name": resource, "patternType": _STRIMZI_PATTERN[pattern]},
            "operations": [op.capitalize() for op in operations],
        }
        for (_, kind, pattern, operations), resources in _grouped(chosen).items()
        for resource in resources
    ]


def strimzi_kafka_user(
    found: Iterable[Binding], principal: str, *, kafka_cluster: str, cluster: Cluster | None = None,
) -> dict[str, Any]:
    """A whole Strimzi ``KafkaUser`` (SCRAM-SHA-512, simple authorisation) of ``principal`` on the Strimzi
    ``Kafka`` named ``kafka_cluster``."""
    return {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaUser",
        "metadata": {"name": username(principal).replace("_", "-"), "labels": {"strimzi.io/cluster": kafka_cluster}},
        "spec": {
            "authentication": {"type": "scram-sha-512"},
            "authorization": {"type": "simple", "acls": strimzi_acls(found, principal, cluster)},
        },
    }


# --- the setup script of docker-compose -------------------------------------------------------------

_SCRIPT_HEAD = r"""#!/usr/bin/env bash
# GENERATED from shared/contracts/topics.py by `python -m shared.contracts.acls --script > deploy/kafka/setup.sh`:
# do not edit (tests/unit/test_acls.py checks it is up to date).
#
# The one-shot kafka-setup job of docker-compose.yml, in the apache/kafka image: SCRAM users, topics and
# ACLs, as the setup's super user (its client certificate, CN=kafka-setup) over the broker's mutual-TLS
# listener. Idempotent: run it again after a change of the registry (existing topics keep their
# configuration; a binding the registry no longer gives is not removed: kafka-acls.sh --remove).
set -euo pipefail

BOOTSTRAP="${KAFKA_SETUP_BOOTSTRAP:-kafka:9091}"
SECRETS="${KAFKA_SETUP_SECRETS:-/etc/kafka/setup}"
BIN="${KAFKA_BIN:-/opt/kafka/bin}"
REPLICATION_FACTOR="${NICHIIKI_KAFKA_REPLICATION_FACTOR:-1}"
# event topics: a consumer may be down a week and still catch up
RETENTION_MS="${NICHIIKI_KAFKA_RETENTION_MS:-1209600000}"                   # 14 days
DLQ_RETENTION_MS="${NICHIIKI_KAFKA_DLQ_RETENTION_MS:-2592000000}"           # 30 days
# compacted partner feeds: a tombstone (a withdrawal) must outlive a partner offline for a week,
# or the partner never learns to forget; recent records stay uncompacted for an hour
FEED_DELETE_RETENTION_MS="${NICHIIKI_KAFKA_FEED_DELETE_RETENTION_MS:-864000000}"   # 10 days
FEED_MIN_COMPACTION_LAG_MS="${NICHIIKI_KAFKA_FEED_MIN_COMPACTION_LAG_MS:-3600000}" # 1 hour
if (( FEED_DELETE_RETENTION_MS < 604800000 )); then
  echo "NICHIIKI_KAFKA_FEED_DELETE_RETENTION_MS=$FEED_DELETE_RETENTION_MS: under 7 days," \
       "a partner offline for a week would miss a withdrawal" >&2
  exit 1
fi
: "${NICHIIKI_KAFKA_KEYSTORE_PASSWORD:?NICHIIKI_KAFKA_KEYSTORE_PASSWORD is not set (.env)}"

ADMIN_CONFIG="$(mktemp)"
trap 'rm -f "$ADMIN_CONFIG"' EXIT
cat > "$ADMIN_CONFIG" <<EOF
security.protocol=SSL
ssl.keystore.type=PKCS12
ssl.keystore.location=$SECRETS/kafka-setup.keystore.p12
ssl.keystore.password=$NICHIIKI_KAFKA_KEYSTORE_PASSWORD
ssl.key.password=$NICHIIKI_KAFKA_KEYSTORE_PASSWORD
ssl.truststore.type=PKCS12
ssl.truststore.location=$SECRETS/truststore.p12
ssl.truststore.password=$NICHIIKI_KAFKA_KEYSTORE_PASSWORD
EOF

for attempt in $(seq 1 30); do
  if "$BIN/kafka-broker-api-versions.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" \
       > /dev/null 2>&1; then
    break
  fi
  if (( attempt == 30 )); then echo "the broker at $BOOTSTRAP does not answer" >&2; exit 1; fi
  sleep 2
done

user() {  # <SCRAM user> <the variable holding its password>
  local password="${!2:-}"
  if [[ -z "$password" ]]; then echo "$2 is not set (.env): no password for Kafka user $1" >&2; exit 1; fi
  if [[ "$password" =~ [],=[] ]]; then echo "$2: a password may not contain , = [ ]" >&2; exit 1; fi
  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --alter \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$password]" --entity-type users --entity-name "$1"
}

topic() {  # <name> <partitions> events|dlq|compacted
  local configs
  case "$3" in
    compacted) configs=(--config cleanup.policy=compact --config "delete.retention.ms=$FEED_DELETE_RETENTION_MS"
                        --config "min.compaction.lag.ms=$FEED_MIN_COMPACTION_LAG_MS") ;;
    dlq) configs=(--config "retention.ms=$DLQ_RETENTION_MS") ;;
    *) configs=(--config "retention.ms=$RETENTION_MS") ;;
  esac
  "$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --create --if-not-exists \
    --topic "$1" --partitions "$2" --replication-factor "$REPLICATION_FACTOR" "${configs[@]}"
}
"""


def setup_script() -> str:
    """The setup script of a single-cluster deployment (docker-compose): every user, topic and binding of
    the registry."""
    lines = [_SCRIPT_HEAD, "# --- SCRAM users (one per principal) ---"]
    lines += [f"user {username(p)} {password_variable(p)}" for p in principals()]
    lines += ["", "# --- topics ---"]
    lines += [f"topic {t.name} {t.partitions} {'compacted' if t.compacted else 'events'}" for t in ALL_TOPICS]
    lines += [f"topic {t.name} {t.partitions} dlq" for t in dead_letter_topics()]
    found = bindings()
    lines += ["", "# --- ACLs ---", *kafka_acls_commands(found), "", 'echo "kafka-setup: done"', ""]
    return "\n".join(lines)


def env_template() -> str:
    """``.env`` lines with a fresh random password for every principal and the keystores."""
    lines = ["# Kafka credentials of docker-compose.yml (python -m shared.contracts.acls --env)"]
    lines.append(f"NICHIIKI_KAFKA_KEYSTORE_PASSWORD={secrets.token_hex(24)}")
    lines += [f"{password_variable(p)}={secrets.token_hex(24)}" for p in principals()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.contracts.acls", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--script", action="store_true", help="the docker-compose setup script (deploy/kafka/setup.sh)")
    what.add_argument("--acls", action="store_true", help="the kafka-acls.sh command lines alone")
    what.add_argument("--env", action="store_true", help=".env lines with random passwords")
    args = parser.parse_args(argv)
    if args.script:
        text = setup_script()
    elif args.acls:
        text = "\n".join(kafka_acls_commands(bindings())) + "\n"
    else:
        text = env_template()
    sys.stdout.write(text)  # the output is the product (a script, .env lines), not a log
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
