#!/usr/bin/env bash
# The monitoring sidecar's role keys for docker compose: writes MODELLOOP_MONITOR_API_KEY
# (admin), _INGEST_KEY (serving's events), _FEEDBACK_KEY (label providers) and
# _ALERTMANAGER_KEY (Alertmanager's webhook) into the .env file that compose reads, each 32
# random bytes in hex. Keys already there are kept, so running it again changes nothing; the
# file is made readable by its owner only. .env is gitignored and outside the image.
#
#   bash scripts/compose_keys.sh [ENV_FILE]    (default: .env beside docker-compose.yml)
#   set -a; . ./.env; set +a                   # then e.g. modelloop monitor status
set -euo pipefail

env_file=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.env"}
umask 077
touch "$env_file"
chmod 600 "$env_file"
# a last line without its newline would run into the first key appended
if [ -s "$env_file" ] && [ -n "$(tail -c 1 "$env_file")" ]; then
  echo >> "$env_file"
fi
for name in MODELLOOP_MONITOR_API_KEY MODELLOOP_MONITOR_INGEST_KEY \
    MODELLOOP_MONITOR_FEEDBACK_KEY MODELLOOP_MONITOR_ALERTMANAGER_KEY; do
  if grep -q "^${name}=." "$env_file"; then
    echo "$name: kept"
    continue
  fi
  # an empty assignment would stand beside the new one: drop it
  grep -v "^${name}=\$" "$env_file" > "$env_file.tmp" || true
  mv "$env_file.tmp" "$env_file"
  printf '%s=%s\n' "$name" "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" >> "$env_file"
  echo "$name: new"
done
echo "keys in $env_file"
