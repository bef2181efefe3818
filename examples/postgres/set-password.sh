#!/usr/bin/env bash
# secretfs rotation `set` hook: make the new password (on stdin) the password of PostgreSQL role
# $PGROLE, through an admin connection.
#
#   env: PGROLE            the role whose password is rotated (required)
#        PGHOST, PGPORT    the server (libpq defaults when unset)
#        PGADMIN_USER      the admin role: a superuser, or a role with CREATEROLE (required)
#        PGADMIN_PASSWORD  its password, or
#        PGADMIN_PASSFILE  a file whose first line is its password
#                          (neither: libpq's own ways, e.g. ~/.pgpass or peer auth on a socket)
#        PGADMIN_DATABASE  the database to connect to (default postgres)
#
# The new password never reaches a command line: it is read with a builtin, and handed to psql
# on its stdin (printf is a builtin) as a psql variable that psql quotes as a literal (:'newpw').
# One trailing newline on stdin is dropped. Exits non-zero with a one-line message on failure;
# the message never holds the password.
set -euo pipefail
set +x

fail() { printf 'set-password: %s\n' "$*" >&2; exit 1; }

[ -n "${PGROLE:-}" ] || fail "PGROLE (the role to rotate) is not set"
[ -n "${PGADMIN_USER:-}" ] || fail "PGADMIN_USER (the admin role) is not set"
psql=$(command -v psql || true)
if [ -z "$psql" ]; then
  for candidate in /usr/lib/postgresql/*/bin/psql; do [ -x "$candidate" ] && psql=$candidate; done
fi
[ -n "$psql" ] || fail "psql not found (install postgresql-client)"

newpw=""
IFS= read -r -d '' newpw || true   # all of stdin (bash cannot hold NUL bytes)
newpw=${newpw%$'\n'}
[ -n "$newpw" ] || fail "no new password on stdin"

if [ -n "${PGADMIN_PASSFILE:-}" ]; then
  [ -r "$PGADMIN_PASSFILE" ] || fail "cannot read PGADMIN_PASSFILE"
  IFS= read -r PGADMIN_PASSWORD < "$PGADMIN_PASSFILE" || true
fi
if [ -n "${PGADMIN_PASSWORD:-}" ]; then
  export PGPASSWORD=$PGADMIN_PASSWORD
else
  unset PGPASSWORD
fi
unset PGADMIN_PASSWORD

# A value for psql's \set 'quoted' argument: backslash and quote escaped, line breaks as \n, \r.
psql_quote() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\'/\'\'}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  printf "'%s'" "$s"
}

# The SETs keep the statement out of the server log where the admin may change them (a superuser
# can); their errors are ignored. ON_ERROR_STOP is on for the ALTER ROLE.
script() {
  printf '%s\n' '\set VERBOSITY terse' '\set SHOW_CONTEXT never' '\set ON_ERROR_STOP 0'
  printf '%s\n' "SET log_statement = 'none';" "SET log_min_error_statement = 'panic';"
  printf '%s\n' '\set ON_ERROR_STOP 1'
  printf '\\set role %s\n' "$(psql_quote "$PGROLE")"
  printf '\\set newpw %s\n' "$(psql_quote "$newpw")"
  printf '%s\n' "ALTER ROLE :\"role\" PASSWORD :'newpw';"
}

export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}
status=0
err=$(script | "$psql" -X -q -w -U "$PGADMIN_USER" -d "${PGADMIN_DATABASE:-postgres}" \
        -f - 2>&1 >/dev/null) || status=$?
if [ "$status" -ne 0 ]; then
  line=$(printf '%s\n' "$err" | grep -v '^[[:space:]]*$' | tail -n 1)
  if [[ "$line" == *"$newpw"* ]]; then line="(message withheld: it contains the password)"; fi
  fail "could not set the password of role ${PGROLE}: ${line#psql:*: }"
fi
