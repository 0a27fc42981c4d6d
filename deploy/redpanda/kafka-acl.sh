#!/bin/bash
# The pipeline's Kafka principals and their ACLs, on Redpanda (docker-compose.secure.yml, service
# kafka-acl). Idempotent: run on every `up`. rpk reads the broker, admin API and the admin's
# credentials from RPK_BROKERS, RPK_ADMIN_HOSTS, RPK_USER, RPK_PASS and RPK_SASL_MECHANISM.
#
# The rule: only the bridge writes the event topics (a record there is what the engine said).
# Names are the defaults of docs/configuration.md: change them here if you change them there.
set -euo pipefail

user() {  # create the SCRAM user, or set its password if it exists
  rpk security user create "$1" -p "$2" --mechanism SCRAM-SHA-256 >/dev/null 2>&1 \
    || rpk security user update "$1" --new-password "$2" --mechanism SCRAM-SHA-256 >/dev/null
}
acl() { rpk security acl create "$@" >/dev/null; }

user bridge "$BRIDGE_PASSWORD"
user worker "$WORKER_PASSWORD"
user api "$API_PASSWORD"
user ops "$OPS_PASSWORD"

EVENTS=(--topic orders.updates --topic orders.trades --topic balances.updates)

# bridge: creates and writes the event topics, its dead letters and its checkpoint (idempotent
# producer), and reads its checkpoint back at start.
acl --allow-principal User:bridge --operation create,describe,write "${EVENTS[@]}" --topic orders.dlq --topic bridge.watermark
acl --allow-principal User:bridge --operation idempotent_write --cluster
acl --allow-principal User:bridge --operation read --topic bridge.watermark --group bridge-1-checkpoint-reader

# worker: reads the event topics and the bridge's checkpoint (its seq guard), writes dead letters,
# and owns its group and Faust's topics (the table changelog, the assignor's leader topic).
acl --allow-principal User:worker --operation read,describe "${EVENTS[@]}" --topic bridge.watermark
acl --allow-principal User:worker --operation create,describe,write --topic orders.dlq
acl --allow-principal User:worker --operation all --resource-pattern-type prefixed --topic ohs-order-history-
acl --allow-principal User:worker --operation all --group ohs-order-history
acl --allow-principal User:worker --operation read --resource-pattern-type prefixed --group ohs-worker-ceiling-
acl --allow-principal User:worker --operation idempotent_write --cluster

# api: tails the event topics with a private group, reads the worker group's committed offsets.
acl --allow-principal User:api --operation read,describe "${EVENTS[@]}"
acl --allow-principal User:api --operation describe,read --group ohs-order-history
acl --allow-principal User:api --operation read --resource-pattern-type prefixed --group ohs-api-tail-

# ops (ohs lag, ohs audit, ohs dlq list/show): reads everything, writes nothing. `ohs dlq redrive`
# needs write on the source topic: grant it for the redrive and revoke it after
# (docs/operations.md, "Credentials").
acl --allow-principal User:ops --operation read,describe "${EVENTS[@]}" --topic orders.dlq --topic bridge.watermark
acl --allow-principal User:ops --operation describe,read --resource-pattern-type prefixed --group ohs-
acl --allow-principal User:ops --operation describe --cluster

echo "kafka-acl: principals bridge, worker, api, ops and their ACLs are in place"
