"""The Kubernetes resources (deploy/k8s), checked offline: no cluster, no kubectl, no network.

- the committed generated files equal the generator's output (deploy/k8s/generate.py);
- every kustomization renders (deploy/k8s/render.py, the kustomize subset they use) and every standard
  resource validates against the Kubernetes 1.30 schemas shipped by ``kubernetes-validate`` (strict:
  an unknown field fails);
- the custom resources (Strimzi KafkaTopic/KafkaUser, KEDA) against hand-written schemas of the fields
  we use, taken from their CRDs (no package ships those schemas; vendoring the CRDs is not an option);
- security settings, checked by hand in the spirit of checkov's Kubernetes checks (non-root, no privilege,
  read-only root filesystem, capabilities dropped, seccomp, limits, probes, pinned images, a
  NetworkPolicy per workload);
- what each NetworkPolicy lets through, evaluated against a small model of the cluster;
- topics, ACLs, settings and secrets against the registries they come from.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from services.console.main import ConsoleConfig
from services.identity.main import IdentityConfig
from shared.contracts.acls import bindings, principals, username
from shared.contracts.topics import ALL_TOPICS, BACKENDS, FRONTS, PARTNER_CODES, SERVICES, dead_letter_topics
from shared.kit.kafka_security import KafkaConnection
from shared.kit.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
Resource = dict[str, Any]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"nichiiki_k8s_{name}", K8S / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate = _load("generate")
render = _load("render")

KUSTOMIZATIONS = ("base", "base/kafka", "overlays/production", "overlays/production/migrate", "jobs/migrate")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Resource]]:
    built: dict[str, list[Resource]] = {name: render.build(K8S / name) for name in KUSTOMIZATIONS}
    return built


@pytest.fixture(scope="module")
def templates() -> list[Resource]:
    documents: list[Resource] = render.load_documents(K8S / "secrets" / "templates.yaml")
    return documents


@pytest.fixture(scope="module")
def production(rendered: dict[str, list[Resource]]) -> list[Resource]:
    return rendered["overlays/production"]


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    (found,) = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    return found


def pod_specs(resources: list[Resource]) -> Iterator[tuple[str, dict[str, Any]]]:
    for r in resources:
        if r["kind"] in ("Deployment", "Job"):
            yield f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"]


# --- generated files and rendering ---------------------------------------------------------------------


def test_committed_files_equal_the_generator_output() -> None:
    assert generate.stale() == [], "run: python deploy/k8s/generate.py"


def test_the_generator_notices_a_stale_file(tmp_path: Path) -> None:
    for path, text in generate.render().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text, encoding="utf-8")
    assert generate.stale(tmp_path) == []
    topics = tmp_path / "base" / "kafka" / "topics.yaml"
    topics.write_text(topics.read_text(encoding="utf-8").replace("partitions: 4", "partitions: 8", 1))
    assert generate.stale(tmp_path) == ["base/kafka/topics.yaml"]


def test_every_service_has_its_resources(rendered: dict[str, list[Resource]]) -> None:
    for name in ("base", "overlays/production"):
        resources = rendered[name]
        for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                     "ServiceAccount"):
            names = {r["metadata"]["name"] for r in of_kind(resources, kind)}
            assert {generate.dns_name(s) for s in SERVICES} <= names, (name, kind)
        for service in SERVICES:
            container = named(resources, "Deployment", generate.dns_name(service))["spec"]["template"]["spec"][
                "containers"][0]
            assert container["command"] == ["python", "-m", f"services.{service}"]
            assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_the_production_overlay_changes_what_it_says(rendered: dict[str, list[Resource]]) -> None:
    base, production = rendered["base"], rendered["overlays/production"]
    assert {r["spec"]["minReplicas"] for r in of_kind(base, "HorizontalPodAutoscaler")} == {1}
    assert {r["spec"]["minReplicas"] for r in of_kind(production, "HorizontalPodAutoscaler")} == {2}
    assert {r["spec"]["replicas"] for r in of_kind(base, "KafkaTopic")} == {1}
    for topic in of_kind(production, "KafkaTopic"):
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["config"]["min.insync.replicas"] == 2
    issuer = named(production, "ConfigMap", "nichiiki-config")["data"]["NICHIIKI_OIDC_ISSUER"]
    assert issuer.startswith("https://")
    subsidy = named(production, "Deployment", "subsidy")["spec"]["template"]["spec"]["containers"][0]
    assert subsidy["resources"]["limits"]["memory"] == "1Gi"
    assert subsidy["readinessProbe"]  # a merge, not a replacement of the container
    assert all(r["metadata"]["labels"]["nichiiki.jp/environment"] == "production" for r in production)
    # the Secrets are created by the operator, never by an apply
    assert of_kind(production, "Secret") == []


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n", encoding="utf-8")
    with pytest.raises(render.KustomizeError, match="namePrefix"):
        render.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - target: {kind: Nothing}\n    patch: '[{op: remove, path: /spec}]'\n",
        encoding="utf-8",
    )
    with pytest.raises(render.KustomizeError, match="matches nothing"):  # a patch that silently missed
        render.build(tmp_path)


def test_the_strategic_merge_merges_named_lists() -> None:
    base = {"containers": [{"name": "a", "image": "x:1", "env": [{"name": "A", "value": "1"}]}], "n": 1}
    patch = {"containers": [{"name": "a", "env": [{"name": "B", "value": "2"}]}, {"name": "b"}], "n": None}
    assert render.strategic_merge(base, patch) == {
        "containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "b"},
        ],
    }


# --- schemas -------------------------------------------------------------------------------------------


def test_standard_resources_validate_against_kubernetes_1_30(
    rendered: dict[str, list[Resource]], templates: list[Resource]
) -> None:
    resources = [r for docs in rendered.values() for r in docs] + templates
    checked = 0
    for resource in resources:
        if resource["apiVersion"].startswith(("kafka.strimzi.io/", "keda.sh/")):
            continue
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked > 50


def test_the_kubernetes_validation_catches_a_typo(production: list[Resource]) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(named(production, "Deployment", "subsidy")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": list(required)}
    if closed:
        schema["additionalProperties"] = False
    return schema


_STR = {"type": "string"}
_METADATA = _obj({
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
    "namespace": _STR,
    "labels": {"type": "object", "additionalProperties": _STR, "required": ["strimzi.io/cluster"]},
    "annotations": {"type": "object", "additionalProperties": _STR},
}, ("name", "namespace", "labels"))
#: The fields of Strimzi's KafkaTopic and KafkaUser (kafka.strimzi.io/v1beta2 CRDs) that these resources
#: use, with the CRDs' types and enums; closed, so a misspelt field fails here as the API server would drop it.
STRIMZI_SCHEMAS: dict[str, dict[str, Any]] = {
    "KafkaTopic": _obj({
        "apiVersion": {"const": "kafka.strimzi.io/v1beta2"}, "kind": {"const": "KafkaTopic"},
        "metadata": _METADATA,
        "spec": _obj({
            "partitions": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
            "config": {"type": "object", "additionalProperties": {"type": ["string", "integer", "boolean"]}},
            "topicName": _STR,
        }, ("partitions", "replicas", "config")),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "KafkaUser": _obj({
        "apiVersion": {"const": "kafka.strimzi.io/v1beta2"}, "kind": {"const": "KafkaUser"},
        "metadata": _METADATA,
        "spec": _obj({
            "authentication": _obj({"type": {"enum": ["tls", "tls-external", "scram-sha-512"]}}, ("type",)),
            "authorization": _obj({
                "type": {"enum": ["simple"]},
                "acls": {"type": "array", "items": _obj({
                    "type": {"enum": ["allow", "deny"]},
                    "host": _STR,
                    "resource": _obj({
                        "type": {"enum": ["topic", "group", "cluster", "transactionalId"]},
                        "name": _STR,
                        "patternType": {"enum": ["literal", "prefix"]},
                    }, ("type",)),
                    "operations": {"type": "array", "minItems": 1, "items": {"enum": [
                        "Read", "Write", "Create", "Delete", "Alter", "Describe", "ClusterAction", "AlterConfigs",
                        "DescribeConfigs", "IdempotentWrite", "All",
                    ]}},
                }, ("resource", "operations"))},
            }, ("type", "acls")),
        }, ("authentication", "authorization")),
    }, ("apiVersion", "kind", "metadata", "spec")),
}


def test_strimzi_resources_match_their_crds(rendered: dict[str, list[Resource]]) -> None:
    resources = rendered["overlays/production"]
    for kind, schema in STRIMZI_SCHEMAS.items():
        assert of_kind(resources, kind)
        for resource in of_kind(resources, kind):
            jsonschema.validate(resource, schema)
    broken = yaml.safe_load(yaml.safe_dump(of_kind(resources, "KafkaUser")[0]))
    broken["spec"]["authentication"]["type"] = "scram-sha-256"  # Strimzi users are SCRAM-SHA-512 only
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, STRIMZI_SCHEMAS["KafkaUser"])


def test_the_keda_example_is_well_formed() -> None:
    """keda.sh/v1alpha1 ScaledObject and TriggerAuthentication: the fields the example uses, by hand."""
    documents = render.load_documents(K8S / "examples" / "keda-consumer-lag.yaml")
    scaled = next(d for d in documents if d["kind"] == "ScaledObject")
    auth = next(d for d in documents if d["kind"] == "TriggerAuthentication")
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "subsidy"
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (kafka,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
    assert kafka["authenticationRef"]["name"] == auth["metadata"]["name"]
    topic = next(t for t in ALL_TOPICS if t.name == kafka["metadata"]["topic"])
    assert "subsidy" in topic.consumers
    # more consumers than partitions would idle
    assert scaled["spec"]["maxReplicaCount"] <= topic.partitions
    assert kafka["metadata"]["consumerGroup"].startswith("nichiiki.subsidy")
    assert {p["parameter"] for p in auth["spec"]["secretTargetRef"]} == {"sasl", "tls", "username", "password", "ca"}


# --- security (checkov-like, by hand) -------------------------------------------------------------------


def test_every_workload_runs_locked_down(rendered: dict[str, list[Resource]]) -> None:
    workloads = [
        w for name in ("overlays/production", "overlays/production/migrate") for w in pod_specs(rendered[name])
    ]
    assert len(workloads) == len(SERVICES) + 1
    for where, pod in workloads:
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod.get("automountServiceAccountToken") is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), (where, key)
        assert all("hostPath" not in v for v in pod.get("volumes", [])), where
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
            assert context["privileged"] is False, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert "add" not in context["capabilities"], where
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, (where, kind)
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, (where, image)
            assert not image.endswith(":latest"), (where, image)
            assert container["imagePullPolicy"] != "Always", where
        if where.startswith("Deployment/"):
            (container,) = pod["containers"]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert container[probe]["httpGet"]["port"] == "http", (where, probe)
            # the read-only root filesystem leaves the state directory and /tmp to emptyDirs
            mounted = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", generate.STATE_DIR} <= mounted, where


def test_every_pod_is_selected_by_a_network_policy(rendered: dict[str, list[Resource]]) -> None:
    for name in ("overlays/production", "overlays/production/migrate"):
        resources = rendered[name]
        policies = of_kind(resources, "NetworkPolicy")
        for workload in (r for r in resources if r["kind"] in ("Deployment", "Job")):
            pod_labels = workload["spec"]["template"]["metadata"]["labels"]
            # a policy of its own (not only the namespace-wide ones), on both directions
            own = [p for p in policies if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], pod_labels)]
            assert any({"Ingress", "Egress"} <= set(p["spec"]["policyTypes"]) for p in own), workload["metadata"]
    base = rendered["base"]
    deny = named(base, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_secret_templates_hold_placeholders_only(templates: list[Resource]) -> None:
    assert {t["metadata"]["name"] for t in templates} == {
        *(generate.secret_name(s) for s in SERVICES), "nichiiki-kafka-ca", "nichiiki-partner-kafka-ca",
    }
    for template in templates:
        assert "data" not in template  # stringData: readable, and nothing base64 to hide a value in
        for key, value in template["stringData"].items():
            if any(word in key for word in ("PASSWORD", "PASSPHRASE", "DSN", "URL", "ca.crt")):
                assert generate.PLACEHOLDER in value, (template["metadata"]["name"], key)
            if "PASSWORD" in key or "PASSPHRASE" in key:
                assert value == generate.PLACEHOLDER, (template["metadata"]["name"], key)


# --- settings ------------------------------------------------------------------------------------------

REQUIRED_ENV = {
    "NICHIIKI_PG_DSN", "NICHIIKI_REDIS_URL", "NICHIIKI_KAFKA_BOOTSTRAP", "NICHIIKI_KAFKA_SECURITY_PROTOCOL",
    "NICHIIKI_KAFKA_SASL_MECHANISM", "NICHIIKI_KAFKA_SASL_USERNAME", "NICHIIKI_KAFKA_SASL_PASSWORD",
    "NICHIIKI_KAFKA_SSL_CAFILE", "NICHIIKI_OIDC_ISSUER", "NICHIIKI_ENV",
}
PARTNER_ENV = {
    "NICHIIKI_PARTNER_KAFKA_BOOTSTRAP", "NICHIIKI_PARTNER_KAFKA_SECURITY_PROTOCOL",
    "NICHIIKI_PARTNER_KAFKA_SASL_MECHANISM", "NICHIIKI_PARTNER_KAFKA_SASL_USERNAME",
    "NICHIIKI_PARTNER_KAFKA_SASL_PASSWORD", "NICHIIKI_PARTNER_KAFKA_SSL_CAFILE",
}


def environment(resources: list[Resource], templates: list[Resource], container: dict[str, Any]) -> dict[str, str]:
    """What a container's envFrom gives it (ConfigMaps as rendered, Secrets from their templates)."""
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(named(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(named(templates, "Secret", source["secretRef"]["name"])["stringData"])
    return env


def test_every_service_gets_its_settings(production: list[Resource], templates: list[Resource]) -> None:
    known = {f"NICHIIKI_{name.upper()}" for name in Settings.model_fields} | {
        f"NICHIIKI_IDENTITY_{name.upper()}" for name in IdentityConfig.model_fields
    } | {f"NICHIIKI_CONSOLE_{name.upper()}" for name in ConsoleConfig.model_fields}
    for service in SERVICES:
        deployment = named(production, "Deployment", generate.dns_name(service))
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = environment(production, templates, container)
        wanted = REQUIRED_ENV | (PARTNER_ENV if service == "partner_gateway" else set())
        if service in FRONTS:  # the console: sessions in Redis, no database, no Kafka
            wanted = {"NICHIIKI_REDIS_URL", "NICHIIKI_OIDC_ISSUER", "NICHIIKI_ENV"}
            assert not {"NICHIIKI_PG_DSN", "NICHIIKI_KAFKA_SASL_PASSWORD"} & set(env), service
        assert wanted <= set(env), (service, wanted - set(env))
        if service != "partner_gateway":
            assert not PARTNER_ENV & set(env), service  # only the gateway reaches the edge
        assert set(env) <= known, (service, set(env) - known)  # no misspelt variable goes unnoticed
        assert env["NICHIIKI_ENV"] == "production"
        assert env["NICHIIKI_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        if service in FRONTS:
            continue
        assert env["NICHIIKI_KAFKA_SASL_USERNAME"] == generate.kafka_user_name(service)
        # the CA files are where the Secret volumes are mounted
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        for key in ("NICHIIKI_KAFKA_SSL_CAFILE", "NICHIIKI_PARTNER_KAFKA_SSL_CAFILE"):
            if key in env:
                assert str(Path(env[key]).parent) in mounts, (service, key)


def test_the_gateway_settings_make_both_kafka_connections(
    production: list[Resource], templates: list[Resource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = named(production, "Deployment", "partner-gateway")["spec"]["template"]["spec"]["containers"]
    env = environment(production, templates, container)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    for key, value in env.items():
        monkeypatch.setenv(key, str(ca) if key.endswith("_SSL_CAFILE") else value)
    settings = Settings()
    internal, edge = KafkaConnection.of(settings, "internal"), KafkaConnection.of(settings, "edge")
    assert internal.bootstrap.startswith(f"{generate.INTERNAL_CLUSTER}-kafka-bootstrap.{generate.KAFKA_NAMESPACE}.")
    assert edge.bootstrap.startswith(f"{generate.EDGE_CLUSTER}-kafka-bootstrap.{generate.EDGE_NAMESPACE}.")
    for connection in (internal, edge):
        assert (connection.security_protocol, connection.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        assert connection.username == "svc-partner-gateway"


# --- topics and users ----------------------------------------------------------------------------------


def test_every_registry_topic_is_a_kafka_topic(production: list[Resource]) -> None:
    topics = {t["metadata"]["name"]: t for t in of_kind(production, "KafkaTopic")}
    registry = ALL_TOPICS + dead_letter_topics()
    assert set(topics) == {t.name for t in registry}
    for topic in registry:
        resource = topics[topic.name]
        edge = topic.cluster == "edge"
        assert resource["metadata"]["labels"]["strimzi.io/cluster"] == (
            generate.EDGE_CLUSTER if edge else generate.INTERNAL_CLUSTER
        )
        assert resource["metadata"]["namespace"] == (generate.EDGE_NAMESPACE if edge else generate.KAFKA_NAMESPACE)
        assert resource["spec"]["partitions"] == topic.partitions
        config = resource["spec"]["config"]
        if topic.compacted:
            week = 7 * 24 * 3600 * 1000
            assert config["cleanup.policy"] == "compact"
            # a tombstone outlives a partner offline for a week
            assert config["delete.retention.ms"] > week
            assert config["min.compaction.lag.ms"] >= 0
        else:
            assert config["cleanup.policy"] == "delete"
            assert config["retention.ms"] >= 7 * 24 * 3600 * 1000
    # every partner's feed is compacted, its trip reports are not
    for code in PARTNER_CODES:
        assert topics[f"partner.{code}.v1"]["spec"]["config"]["cleanup.policy"] == "compact"
        assert topics[f"partner.{code}.trips.v1"]["spec"]["config"]["cleanup.policy"] == "delete"


def test_kafka_users_carry_the_registry_bindings(production: list[Resource]) -> None:
    users = of_kind(production, "KafkaUser")
    granted = set()
    for user in users:
        cluster = "edge" if user["metadata"]["labels"]["strimzi.io/cluster"] == generate.EDGE_CLUSTER else "internal"
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        for acl in user["spec"]["authorization"]["acls"]:
            assert not {"Create", "Delete", "Alter", "AlterConfigs", "All"} & set(acl["operations"]), user
            assert acl["resource"]["name"] not in ("*", ""), user
            for operation in acl["operations"]:
                granted.add((user["metadata"]["name"], cluster, acl["resource"]["type"], acl["resource"]["name"],
                             acl["resource"]["patternType"], operation))
    expected = {
        (username(b.principal).replace("_", "-"), b.cluster, b.resource_type.lower(), b.resource,
         "prefix" if b.pattern == "PREFIXED" else "literal", b.operation.capitalize())
        for b in bindings()
    }
    assert granted == expected
    # every principal has its user; the same name twice only across the two clusters' namespaces
    names = {username(p).replace("_", "-") for p in principals()}
    assert {u["metadata"]["name"] for u in users} == names
    placed = [(u["metadata"]["namespace"], u["metadata"]["name"]) for u in users]
    assert len(placed) == len(set(placed))


def test_partners_reach_only_their_own_topics_on_the_edge(production: list[Resource]) -> None:
    for code in PARTNER_CODES:
        (user,) = [u for u in of_kind(production, "KafkaUser") if u["metadata"]["name"] == f"partner-{code}"]
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == generate.EDGE_CLUSTER
        topics = {
            acl["resource"]["name"]: set(acl["operations"])
            for acl in user["spec"]["authorization"]["acls"] if acl["resource"]["type"] == "topic"
        }
        assert topics == {f"partner.{code}.v1": {"Read", "Describe"}, f"partner.{code}.trips.v1": {"Write", "Describe"}}
    residents = "registration.residents.v1"
    readers = {
        u["metadata"]["name"] for u in of_kind(production, "KafkaUser")
        for acl in u["spec"]["authorization"]["acls"]
        if acl["resource"]["name"] == residents and "Read" in acl["operations"]
    }
    assert readers and all(name.startswith("svc-") for name in readers)


# --- what the NetworkPolicies let through --------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str
    labels: dict[str, str] = field(hash=False)
    port: int
    protocol: str = "TCP"
    ip: str = "10.1.2.3"  # a pod address


NAMESPACE_LABELS = {
    ns: {"kubernetes.io/metadata.name": ns}
    for ns in ("nichiiki", "kafka", "kafka-edge", "nichiiki-data", "kube-system", "ingress-nginx", "nichiiki-console",
               "default")
}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
        if expression["operator"] == "Exists" and not present:
            return False
        if expression["operator"] not in ("In", "Exists"):
            raise AssertionError(f"operator {expression['operator']} not modelled")
    return True


def _peer_matches(rule_peer: dict[str, Any], policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        address = ipaddress.ip_address(peer.ip)
        block = rule_peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if peer.namespace not in NAMESPACE_LABELS:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], NAMESPACE_LABELS[peer.namespace]):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return "podSelector" not in rule_peer or _selects(rule_peer["podSelector"], peer.labels)


def _port_matches(ports: list[dict[str, Any]] | None, peer: Peer) -> bool:
    return ports is None or any(p["port"] == peer.port and p.get("protocol", "TCP") == peer.protocol for p in ports)


def allowed(policies: list[Resource], source: Peer, destination: Peer) -> bool:
    """Whether both ends' policies let a connection from ``source`` to ``destination`` through (a pod no
    policy selects for a direction is open in that direction, as in Kubernetes)."""

    def side(pod: Peer, direction: str, other: Peer) -> bool:
        chosen = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                  and direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod.labels)]
        if not chosen:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        return any(
            _port_matches(rule.get("ports"), destination)
            and (("to" not in rule and "from" not in rule)
                 or any(_peer_matches(peer, p["metadata"]["namespace"], other) for peer in rule[peers_key]))
            for p in chosen for rule in p["spec"].get(key, [])
        )

    return side(source, "Egress", destination) and side(destination, "Ingress", source)


def world() -> list[Peer]:
    peers = [
        Peer("kafka", "kafka", {"strimzi.io/cluster": "nichiiki", "strimzi.io/kind": "Kafka"}, 9093),
        Peer("edge-kafka", "kafka-edge", {"strimzi.io/cluster": "nichiiki-edge", "strimzi.io/kind": "Kafka"}, 9093),
        Peer("redis", "nichiiki-data", {"app.kubernetes.io/name": "redis"}, 6379),
        Peer("dns", "kube-system", {"k8s-app": "kube-dns"}, 53, "UDP"),
        Peer("ingress-controller", "ingress-nginx", {"app": "ingress"}, 443),
        Peer("mail-relay", "", {}, 587, ip="203.0.113.25"),
        Peer("internet-https", "", {}, 443, ip="203.0.113.80"),
        Peer("other-namespace", "default", {"app": "x"}, 8000),
    ]
    peers += [Peer(f"db-{s}", "nichiiki-data", {"nichiiki.jp/database": s}, 5432) for s in BACKENDS]
    peers += [Peer(s, "nichiiki", generate.labels(s), 8000) for s in SERVICES]
    return peers


def test_each_service_reaches_only_what_it_needs(production: list[Resource]) -> None:
    policies = of_kind(production, "NetworkPolicy")
    peers = world()
    for service in SERVICES:
        source = next(p for p in peers if p.name == service)
        reached = {p.name for p in peers if p is not source and allowed(policies, source, p)}
        expected = {"kafka", f"db-{service}", "redis", "identity", "dns", "ingress-controller"}
        if service in FRONTS:  # Redis and the services' HTTP APIs; no database, no Kafka
            expected = {"redis", "dns", "ingress-controller", *BACKENDS}
        if service == "partner_gateway":
            expected.add("edge-kafka")
        if service == "notification":
            expected.add("mail-relay")
        expected.discard(service)  # identity is itself
        assert reached == expected, (service, reached ^ expected)


def test_each_service_is_reached_only_from_the_ingress_and_the_console(production: list[Resource]) -> None:
    policies = of_kind(production, "NetworkPolicy")
    ingress = Peer("ingress", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, 0)
    console = Peer("console", "nichiiki-console", {"app": "console"}, 0)
    stranger = Peer("stranger", "default", {"app": "x"}, 0)
    for service in SERVICES:
        target = Peer(service, "nichiiki", generate.labels(service), 8000)
        assert allowed(policies, ingress, target) and allowed(policies, console, target), service
        assert not allowed(policies, stranger, target), service
        assert not allowed(policies, ingress, Peer(service, "nichiiki", generate.labels(service), 9000)), service
        others = [Peer(s, "nichiiki", generate.labels(s), 0) for s in SERVICES if s != service]
        # the services call one another only for the issuer's keys; the console calls every service
        assert all(
            allowed(policies, o, target) == (service == "identity" or (o.name in FRONTS and service not in FRONTS))
            for o in others
        ), service


def test_the_migration_job_reaches_the_databases_only(rendered: dict[str, list[Resource]]) -> None:
    resources = rendered["overlays/production/migrate"] + rendered["overlays/production"]
    policies = of_kind(resources, "NetworkPolicy")
    job = named(resources, "Job", "nichiiki-migrate")
    source = Peer("migrate", "nichiiki", job["spec"]["template"]["metadata"]["labels"], 0)
    reached = {p.name for p in world() if allowed(policies, source, p)}
    assert reached == {"dns", *(f"db-{s}" for s in BACKENDS)}
    pod = job["spec"]["template"]["spec"]
    steps = pod["initContainers"] + pod["containers"]
    assert [s["command"] for s in steps] == [["nichiiki", "migrate", s] for s in BACKENDS]
    assert [s["envFrom"][-1]["secretRef"]["name"] for s in steps] == [generate.secret_name(s) for s in BACKENDS]
