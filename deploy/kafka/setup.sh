#!/usr/bin/env bash
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

# --- SCRAM users (one per principal) ---
user svc-registration NICHIIKI_KAFKA_PASSWORD_SVC_REGISTRATION
user svc-certification NICHIIKI_KAFKA_PASSWORD_SVC_CERTIFICATION
user svc-subsidy NICHIIKI_KAFKA_PASSWORD_SVC_SUBSIDY
user svc-donation NICHIIKI_KAFKA_PASSWORD_SVC_DONATION
user svc-notification NICHIIKI_KAFKA_PASSWORD_SVC_NOTIFICATION
user svc-partner_gateway NICHIIKI_KAFKA_PASSWORD_SVC_PARTNER_GATEWAY
user svc-identity NICHIIKI_KAFKA_PASSWORD_SVC_IDENTITY
user svc-planning NICHIIKI_KAFKA_PASSWORD_SVC_PLANNING
user svc-insights NICHIIKI_KAFKA_PASSWORD_SVC_INSIGHTS
user svc-listings NICHIIKI_KAFKA_PASSWORD_SVC_LISTINGS
user partner-jal NICHIIKI_KAFKA_PASSWORD_PARTNER_JAL
user partner-ana NICHIIKI_KAFKA_PASSWORD_PARTNER_ANA
user partner-jreast NICHIIKI_KAFKA_PASSWORD_PARTNER_JREAST
user partner-sadokisen NICHIIKI_KAFKA_PASSWORD_PARTNER_SADOKISEN
user partner-kyushuyusen NICHIIKI_KAFKA_PASSWORD_PARTNER_KYUSHUYUSEN
user ops NICHIIKI_KAFKA_PASSWORD_OPS

# --- topics ---
topic registration.residents.v1 4 events
topic registration.erasures.v1 2 events
topic certification.applications.v1 4 events
topic certification.certificates.v1 4 events
topic subsidy.grants.v1 4 events
topic subsidy.budgets.v1 2 events
topic donation.donations.v1 4 events
topic notification.deliveries.v1 2 events
topic gateway.trips.v1 4 events
topic gateway.partners.v1 1 compacted
topic registration.exports.v1 2 events
topic privacy.export-parts.v1 2 events
topic planning.plans.v1 2 events
topic planning.corporations.v1 2 events
topic planning.councils.v1 1 events
topic listings.listings.v1 2 events
topic listings.digests.v1 2 events
topic partner.jal.v1 2 compacted
topic partner.jal.trips.v1 2 events
topic partner.ana.v1 2 compacted
topic partner.ana.trips.v1 2 events
topic partner.jreast.v1 2 compacted
topic partner.jreast.trips.v1 2 events
topic partner.sadokisen.v1 2 compacted
topic partner.sadokisen.trips.v1 2 events
topic partner.kyushuyusen.v1 2 compacted
topic partner.kyushuyusen.trips.v1 2 events
topic registration.residents.v1.dlq 1 dlq
topic registration.erasures.v1.dlq 1 dlq
topic certification.applications.v1.dlq 1 dlq
topic certification.certificates.v1.dlq 1 dlq
topic subsidy.grants.v1.dlq 1 dlq
topic donation.donations.v1.dlq 1 dlq
topic gateway.trips.v1.dlq 1 dlq
topic gateway.partners.v1.dlq 1 dlq
topic registration.exports.v1.dlq 1 dlq
topic privacy.export-parts.v1.dlq 1 dlq
topic planning.plans.v1.dlq 1 dlq
topic planning.corporations.v1.dlq 1 dlq
topic listings.digests.v1.dlq 1 dlq
topic partner.jal.trips.v1.dlq 1 dlq
topic partner.ana.trips.v1.dlq 1 dlq
topic partner.jreast.trips.v1.dlq 1 dlq
topic partner.sadokisen.trips.v1.dlq 1 dlq
topic partner.kyushuyusen.trips.v1.dlq 1 dlq

# --- ACLs ---
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:ops --operation Read --resource-pattern-type literal --group nichiiki.dlq-replay
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:ops --operation Describe --operation Write --resource-pattern-type literal --topic certification.applications.v1 --topic certification.certificates.v1 --topic donation.donations.v1 --topic gateway.partners.v1 --topic gateway.trips.v1 --topic listings.digests.v1 --topic partner.ana.trips.v1 --topic partner.jal.trips.v1 --topic partner.jreast.trips.v1 --topic partner.kyushuyusen.trips.v1 --topic partner.sadokisen.trips.v1 --topic planning.corporations.v1 --topic planning.plans.v1 --topic privacy.export-parts.v1 --topic registration.erasures.v1 --topic registration.exports.v1 --topic registration.residents.v1 --topic subsidy.grants.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:ops --operation Describe --operation Read --resource-pattern-type literal --topic certification.applications.v1.dlq --topic certification.certificates.v1.dlq --topic donation.donations.v1.dlq --topic gateway.partners.v1.dlq --topic gateway.trips.v1.dlq --topic listings.digests.v1.dlq --topic partner.ana.trips.v1.dlq --topic partner.jal.trips.v1.dlq --topic partner.jreast.trips.v1.dlq --topic partner.kyushuyusen.trips.v1.dlq --topic partner.sadokisen.trips.v1.dlq --topic planning.corporations.v1.dlq --topic planning.plans.v1.dlq --topic privacy.export-parts.v1.dlq --topic registration.erasures.v1.dlq --topic registration.exports.v1.dlq --topic registration.residents.v1.dlq --topic subsidy.grants.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-ana --operation Read --resource-pattern-type prefixed --group ana.
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-ana --operation Describe --operation Write --resource-pattern-type literal --topic partner.ana.trips.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-ana --operation Describe --operation Read --resource-pattern-type literal --topic partner.ana.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-jal --operation Read --resource-pattern-type prefixed --group jal.
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-jal --operation Describe --operation Write --resource-pattern-type literal --topic partner.jal.trips.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-jal --operation Describe --operation Read --resource-pattern-type literal --topic partner.jal.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-jreast --operation Read --resource-pattern-type prefixed --group jreast.
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-jreast --operation Describe --operation Write --resource-pattern-type literal --topic partner.jreast.trips.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-jreast --operation Describe --operation Read --resource-pattern-type literal --topic partner.jreast.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-kyushuyusen --operation Read --resource-pattern-type prefixed --group kyushuyusen.
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-kyushuyusen --operation Describe --operation Write --resource-pattern-type literal --topic partner.kyushuyusen.trips.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-kyushuyusen --operation Describe --operation Read --resource-pattern-type literal --topic partner.kyushuyusen.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-sadokisen --operation Read --resource-pattern-type prefixed --group sadokisen.
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-sadokisen --operation Describe --operation Write --resource-pattern-type literal --topic partner.sadokisen.trips.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:partner-sadokisen --operation Describe --operation Read --resource-pattern-type literal --topic partner.sadokisen.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-certification --operation Read --resource-pattern-type prefixed --group nichiiki.certification
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-certification --operation Describe --operation Write --resource-pattern-type literal --topic certification.applications.v1 --topic certification.certificates.v1 --topic gateway.partners.v1.dlq --topic planning.plans.v1.dlq --topic privacy.export-parts.v1 --topic registration.exports.v1.dlq --topic registration.residents.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-certification --operation Describe --operation Read --resource-pattern-type literal --topic gateway.partners.v1 --topic planning.plans.v1 --topic registration.exports.v1 --topic registration.residents.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-donation --operation Read --resource-pattern-type prefixed --group nichiiki.donation
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-donation --operation Describe --operation Write --resource-pattern-type literal --topic donation.donations.v1 --topic privacy.export-parts.v1 --topic registration.erasures.v1.dlq --topic registration.exports.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-donation --operation Describe --operation Read --resource-pattern-type literal --topic registration.erasures.v1 --topic registration.exports.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-identity --operation Read --resource-pattern-type prefixed --group nichiiki.identity
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-identity --operation Describe --operation Read --resource-pattern-type literal --topic registration.erasures.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-identity --operation Describe --operation Write --resource-pattern-type literal --topic registration.erasures.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-insights --operation Read --resource-pattern-type prefixed --group nichiiki.insights
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-insights --operation Describe --operation Read --resource-pattern-type literal --topic certification.certificates.v1 --topic donation.donations.v1 --topic planning.corporations.v1 --topic planning.plans.v1 --topic registration.residents.v1 --topic subsidy.grants.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-insights --operation Describe --operation Write --resource-pattern-type literal --topic certification.certificates.v1.dlq --topic donation.donations.v1.dlq --topic planning.corporations.v1.dlq --topic planning.plans.v1.dlq --topic registration.residents.v1.dlq --topic subsidy.grants.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-listings --operation Read --resource-pattern-type prefixed --group nichiiki.listings
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-listings --operation Describe --operation Read --resource-pattern-type literal --topic certification.certificates.v1 --topic planning.corporations.v1 --topic registration.exports.v1 --topic registration.residents.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-listings --operation Describe --operation Write --resource-pattern-type literal --topic certification.certificates.v1.dlq --topic listings.digests.v1 --topic listings.listings.v1 --topic planning.corporations.v1.dlq --topic privacy.export-parts.v1 --topic registration.exports.v1.dlq --topic registration.residents.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-notification --operation Read --resource-pattern-type prefixed --group nichiiki.notification
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-notification --operation Describe --operation Read --resource-pattern-type literal --topic certification.applications.v1 --topic certification.certificates.v1 --topic donation.donations.v1 --topic listings.digests.v1 --topic registration.exports.v1 --topic registration.residents.v1 --topic subsidy.grants.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-notification --operation Describe --operation Write --resource-pattern-type literal --topic certification.applications.v1.dlq --topic certification.certificates.v1.dlq --topic donation.donations.v1.dlq --topic listings.digests.v1.dlq --topic notification.deliveries.v1 --topic privacy.export-parts.v1 --topic registration.exports.v1.dlq --topic registration.residents.v1.dlq --topic subsidy.grants.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-partner_gateway --operation Read --resource-pattern-type prefixed --group nichiiki.partner_gateway
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-partner_gateway --operation Describe --operation Read --resource-pattern-type literal --topic certification.certificates.v1 --topic partner.ana.trips.v1 --topic partner.jal.trips.v1 --topic partner.jreast.trips.v1 --topic partner.kyushuyusen.trips.v1 --topic partner.sadokisen.trips.v1 --topic registration.exports.v1 --topic registration.residents.v1 --topic subsidy.grants.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-partner_gateway --operation Describe --operation Write --resource-pattern-type literal --topic certification.certificates.v1.dlq --topic gateway.partners.v1 --topic gateway.trips.v1 --topic partner.ana.trips.v1.dlq --topic partner.ana.v1 --topic partner.jal.trips.v1.dlq --topic partner.jal.v1 --topic partner.jreast.trips.v1.dlq --topic partner.jreast.v1 --topic partner.kyushuyusen.trips.v1.dlq --topic partner.kyushuyusen.v1 --topic partner.sadokisen.trips.v1.dlq --topic partner.sadokisen.v1 --topic privacy.export-parts.v1 --topic registration.exports.v1.dlq --topic registration.residents.v1.dlq --topic subsidy.grants.v1.dlq
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-planning --operation Describe --operation Write --resource-pattern-type literal --topic planning.corporations.v1 --topic planning.councils.v1 --topic planning.plans.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-registration --operation Read --resource-pattern-type prefixed --group nichiiki.registration
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-registration --operation Describe --operation Read --resource-pattern-type literal --topic gateway.partners.v1 --topic privacy.export-parts.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-registration --operation Describe --operation Write --resource-pattern-type literal --topic gateway.partners.v1.dlq --topic privacy.export-parts.v1.dlq --topic registration.erasures.v1 --topic registration.exports.v1 --topic registration.residents.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-subsidy --operation Read --resource-pattern-type prefixed --group nichiiki.subsidy
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-subsidy --operation Describe --operation Read --resource-pattern-type literal --topic certification.certificates.v1 --topic donation.donations.v1 --topic gateway.partners.v1 --topic gateway.trips.v1 --topic registration.erasures.v1 --topic registration.exports.v1
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add --allow-principal User:svc-subsidy --operation Describe --operation Write --resource-pattern-type literal --topic certification.certificates.v1.dlq --topic donation.donations.v1.dlq --topic gateway.partners.v1.dlq --topic gateway.trips.v1.dlq --topic privacy.export-parts.v1 --topic registration.erasures.v1.dlq --topic registration.exports.v1.dlq --topic subsidy.budgets.v1 --topic subsidy.grants.v1

echo "kafka-setup: done"
