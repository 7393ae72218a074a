#!/usr/bin/env bash
# The one-shot kafka-certs job of docker-compose.yml: a private CA and the TLS material of the Kafka
# deployment, made once with keytool (the apache/kafka image is a JRE: keytool, no openssl), PKCS12.
#
#   $CA_DIR/ca.crt                          the CA certificate (PEM): every client verifies the broker with it
#   $BROKER_DIR/kafka.keystore.p12          the broker's key and certificate (CN=kafka, names kafka, localhost
#                                           and $NICHIIKI_KAFKA_EXTERNAL_HOST), signed by the CA
#   $BROKER_DIR/truststore.p12              the CA, for the broker's mutual-TLS listeners (controller, internal)
#   $SETUP_DIR/kafka-setup.keystore.p12     the setup job's client certificate (CN=kafka-setup, a super user)
#   $SETUP_DIR/truststore.p12               the CA, for the setup job
#
# One volume per directory, so that each container mounts only what it needs: services get ca.crt alone,
# the broker its keystore, the setup job its own; the CA's private key ($CA_PRIVATE_DIR) is mounted by no
# other container. Already made: nothing is done (remove the volumes to rotate).
set -euo pipefail

CA_DIR="${CA_DIR:-/certs/ca}"
CA_PRIVATE_DIR="${CA_PRIVATE_DIR:-/certs/ca-private}"
BROKER_DIR="${BROKER_DIR:-/certs/broker}"
SETUP_DIR="${SETUP_DIR:-/certs/setup}"
EXTERNAL_HOST="${NICHIIKI_KAFKA_EXTERNAL_HOST:-localhost}"
VALIDITY_DAYS="${NICHIIKI_KAFKA_CERT_VALIDITY_DAYS:-825}"
OWNER="${CERT_OWNER:-1000:1000}"   # appuser of the apache/kafka image
PASS="${NICHIIKI_KAFKA_KEYSTORE_PASSWORD:?NICHIIKI_KAFKA_KEYSTORE_PASSWORD is not set (.env)}"

if [[ -s "$CA_DIR/ca.crt" && -s "$BROKER_DIR/kafka.keystore.p12" && -s "$SETUP_DIR/kafka-setup.keystore.p12" ]]; then
  echo "kafka-certs: already made"
  exit 0
fi

umask 077
mkdir -p "$CA_DIR" "$CA_PRIVATE_DIR" "$BROKER_DIR" "$SETUP_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

kt() { keytool -noprompt -storetype PKCS12 -storepass "$PASS" "$@"; }

# the CA: a self-signed certificate allowed to sign (basic constraints CA:true)
rm -f "$CA_PRIVATE_DIR/ca.p12"
kt -genkeypair -keystore "$CA_PRIVATE_DIR/ca.p12" -alias ca -dname "CN=Nichiiki Kafka CA" \
   -keyalg RSA -keysize 3072 -validity "$VALIDITY_DAYS" -ext bc:c -ext KU=keyCertSign,cRLSign
kt -exportcert -rfc -keystore "$CA_PRIVATE_DIR/ca.p12" -alias ca -file "$WORK/ca.crt"

# <keystore> <alias> <CN> <extended key usage> [subject alternative names]: a key pair signed by the CA
signed() {
  local keystore="$1" alias="$2" cn="$3" eku="$4" san="${5:-}"
  rm -f "$keystore"
  kt -genkeypair -keystore "$keystore" -alias "$alias" -dname "CN=$cn" -keyalg RSA -keysize 2048 \
     -validity "$VALIDITY_DAYS"
  kt -certreq -keystore "$keystore" -alias "$alias" -file "$WORK/$alias.csr"
  local extensions=(-ext "KU=digitalSignature,keyEncipherment" -ext "EKU=$eku")
  if [[ -n "$san" ]]; then extensions+=(-ext "SAN=$san"); fi
  kt -gencert -keystore "$CA_PRIVATE_DIR/ca.p12" -alias ca -infile "$WORK/$alias.csr" -outfile "$WORK/$alias.crt" \
     -rfc -validity "$VALIDITY_DAYS" "${extensions[@]}"
  kt -importcert -keystore "$keystore" -alias ca -file "$WORK/ca.crt"        # the chain first
  kt -importcert -keystore "$keystore" -alias "$alias" -file "$WORK/$alias.crt"
}

truststore() {
  rm -f "$1"
  kt -importcert -keystore "$1" -alias ca -file "$WORK/ca.crt"
}

san="dns:kafka,dns:localhost"
if [[ "$EXTERNAL_HOST" != "localhost" ]]; then
  if [[ "$EXTERNAL_HOST" =~ ^[0-9.]+$ ]]; then san="$san,ip:$EXTERNAL_HOST"; else san="$san,dns:$EXTERNAL_HOST"; fi
fi
# the broker's certificate serves its listeners and authenticates it on its own mutual-TLS ones
signed "$BROKER_DIR/kafka.keystore.p12" kafka kafka "serverAuth,clientAuth" "$san"
truststore "$BROKER_DIR/truststore.p12"
signed "$SETUP_DIR/kafka-setup.keystore.p12" kafka-setup kafka-setup clientAuth
truststore "$SETUP_DIR/truststore.p12"
cp "$WORK/ca.crt" "$CA_DIR/ca.crt"

# readable by the broker and the setup job (the image's appuser); ca.crt by anyone (the services' own user)
chown -R "$OWNER" "$BROKER_DIR" "$SETUP_DIR"
chmod 0700 "$CA_PRIVATE_DIR" "$BROKER_DIR" "$SETUP_DIR"
chmod 0755 "$CA_DIR"
chmod 0644 "$CA_DIR/ca.crt"
echo "kafka-certs: CA, broker and setup certificates made (broker names: $san)"
