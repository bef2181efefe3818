#!/usr/bin/env bash
# A two-minute tour of secretfs on a throw-away embedded store in .demo/ (run by `make demo`).
# The example values are generated here and exist only in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

demo="${SECRETFS_DEMO_DIR:-$PWD/.demo}"
rm -rf "$demo"
mkdir -m 700 "$demo"
cat > "$demo/config.yaml" <<'YAML'
# Paths are relative to this file's folder.
secrets_manager:
  backend: { type: local, path: store.db }
  encryption: { provider: file, key_file: master.key }
  audit: { path: audit.log }
YAML
export SECRETFS_CONFIG="$demo/config.yaml"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step secretfs init
step secretfs secrets put db_password --generate --length 24 \
     --description "Database password" --tag environment=demo --tag service=database \
     --rotate-every 90d --overlap 1h
head -c 18 /dev/urandom | base64 | secretfs secrets put api_keys/stripe --stdin --description "Stripe API key" >/dev/null
token=$(head -c 15 /dev/urandom | base64)
printf '\n\033[1m$ echo '"'"'{"user": "demo-bot", "token": "…"}'"'"' | secretfs secrets put api_keys/github --stdin --json-value\033[0m\n'
printf '{"user": "demo-bot", "token": "%s"}' "$token" | secretfs secrets put api_keys/github --stdin --json-value
step secretfs secrets put db_password --generate --length 24
step secretfs secrets list
step secretfs secrets info db_password
step secretfs secrets versions db_password
printf '\n\033[1m$ secretfs secrets get db_password/latest | wc -c\033[0m\n'
secretfs secrets get db_password/latest | wc -c
printf '\n\033[1m$ secretfs secrets get secretfs://api_keys/github/latest/user\033[0m\n'
secretfs secrets get secretfs://api_keys/github/latest/user; echo
printf '\n\033[1m$ secretfs secrets get db_pasword   # a typo\033[0m\n'
secretfs secrets get db_pasword || echo "(exit code $?)"
printf '\nThe store is %s; nothing in it is plaintext:\n' "$demo/store.db"
value=$(secretfs secrets get db_password)
if grep -rqaF -- "$value" "$demo"; then echo "FOUND PLAINTEXT"; exit 1; else echo "grep for the current value in .demo/: no match"; fi
if [ "$(id -u)" = 0 ] && [ -c /dev/fuse ]; then
  mnt="$demo/mnt"
  trap 'secretfs umount "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true' EXIT
  step secretfs mount "$mnt" --log-file "$demo/mount.log"
  step ls "$mnt" "$mnt/db_password" "$mnt/api_keys/github/latest"
  printf '\n\033[1m$ wc -c %s/db_password/latest/value\033[0m\n' "$mnt"
  wc -c < "$mnt/db_password/latest/value"
  step cat "$mnt/api_keys/github/latest/user"; echo
  step getfattr -d "$mnt/db_password/latest/value"
  printf '\n\033[1m$ setpriv --reuid 4242 --regid 4242 --clear-groups cat …/db_password/latest/value\033[0m\n'
  setpriv --reuid 4242 --regid 4242 --clear-groups cat "$mnt/db_password/latest/value" \
    || echo "(denied: only root and the mount owner may read without a policy)"
  step secretfs umount "$mnt"
  trap - EXIT
else
  printf '\n(run as root with /dev/fuse to see the mount part of the tour)\n'
fi
printf '\nTry it yourself:  export SECRETFS_CONFIG=%s\n' "$SECRETFS_CONFIG"
