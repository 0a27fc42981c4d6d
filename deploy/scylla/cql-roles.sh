#!/bin/bash
# The pipeline's Cassandra/ScyllaDB roles and grants (docker-compose.secure.yml, service
# cql-roles). Idempotent: run on every `up`, as the server's own superuser.
#
# The rule: only the worker writes. It creates the keyspace (`ohs db migrate`, the migrate
# service runs as worker), which makes it the keyspace's owner with every permission on it;
# the API and the on-call tools read. The bridge has no role: it never talks to Cassandra.
# A password must not contain a single quote (it is spliced into CQL).
set -euo pipefail

cql() { cqlsh "$CQL_HOST" -u cassandra -p "$CASSANDRA_PASSWORD" -e "$1"; }
role() {  # create the login role, or set its password if it exists
  cql "CREATE ROLE IF NOT EXISTS $1 WITH LOGIN = true AND PASSWORD = '$2'"
  cql "ALTER ROLE $1 WITH PASSWORD = '$2'"
}

until cql "SELECT release_version FROM system.local" >/dev/null 2>&1; do sleep 2; done
role worker "$WORKER_PASSWORD"
role api "$API_PASSWORD"
role ops "$OPS_PASSWORD"
cql "GRANT CREATE ON ALL KEYSPACES TO worker"
cql "GRANT SELECT ON ALL KEYSPACES TO api"
cql "GRANT SELECT ON ALL KEYSPACES TO ops"
echo "cql-roles: roles worker, api, ops and their grants are in place"
