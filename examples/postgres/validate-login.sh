#!/usr/bin/env bash
# secretfs rotation `validate` hook: exit 0 when PostgreSQL role $PGROLE can log in with the
# password on stdin (a real login over the network, then `select 1`).
#
#   env: PGROLE          the role (required)
#        PGHOST, PGPORT  the server (libpq defaults when unset; give a TCP host such as
#                        127.0.0.1: a unix socket may be `peer`/`trust` and prove nothing)
#        PGDATABASE      the database to log in to (default postgres)
#
# The password goes to psql only in PGPASSWORD in its environment, never on a command line.
# One trailing newline on stdin is dropped. Exits non-zero with a one-line message on failure.
set -euo pipefail
set +x

fail() { printf 'validate-login: %s\n' "$*" >&2; exit 1; }

[ -n "${PGROLE:-}" ] || fail "PGROLE (the role to check) is not set"
psql=$(command -v psql || true)
if [ -z "$psql" ]; then
  for candidate in /usr/lib/postgresql/*/bin/psql; do [ -x "$candidate" ] && psql=$candidate; done
fi
[ -n "$psql" ] || fail "psql not found (install postgresql-client)"

pw=""
IFS= read -r -d '' pw || true
pw=${pw%$'\n'}
[ -n "$pw" ] || fail "no password on stdin"

# Only this password may be tried: no ~/.pgpass, no service file.
export PGPASSWORD=$pw
export PGPASSFILE=/dev/null
unset PGSERVICE PGSERVICEFILE
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}

status=0
out=$("$psql" -X -q -w -At -U "$PGROLE" -d "${PGDATABASE:-postgres}" -c 'select 1' 2>&1) \
  || status=$?
if [ "$status" -ne 0 ] || [ "$out" != 1 ]; then
  line=$(printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | tail -n 1)
  if [[ "$line" == *"$pw"* ]]; then line="(message withheld: it contains the password)"; fi
  fail "role ${PGROLE} cannot log in with the new password: ${line#psql: error: }"
fi
