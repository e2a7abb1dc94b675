#!/usr/bin/env bash
# Validate docker-compose.yml the way Docker would read it (`docker compose config`), with
# no engine needed. Uses the compose plugin, else Debian's docker-compose; under CI=true a
# missing client is installed with apt (as root) or fails, elsewhere it is skipped with a note.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

in_ci() { [[ ${CI:-} =~ ^(1|true|yes)$ ]]; }

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif in_ci && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "compose_check: installing docker-compose with apt-get" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >&2
    compose=(docker-compose)
elif in_ci; then
    echo "compose_check: error: no docker compose client (apt-get install docker-compose)" >&2
    exit 1
else
    echo "compose_check: skipped: no docker compose client (apt-get install docker-compose)" >&2
    exit 0
fi
# Both the example config and a user's own file must make a valid project.
"${compose[@]}" -f docker-compose.yml config -q
STREAMSINK_FILE=./streamsink/demo.toml "${compose[@]}" -f docker-compose.yml config -q
echo "compose_check: docker-compose.yml is valid (${compose[*]})"
