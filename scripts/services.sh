#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer, for the tests and the demo.
#
# Only the local defaults are managed: Redis on 127.0.0.1:6379 and PostgreSQL on
# 127.0.0.1:5432 (user postgres, trust auth, the database DATABASE_URL names, default `test`).
# Missing servers are installed with apt (as root) and started; a REDIS_URL or DATABASE_URL
# that points elsewhere is only waited for. Also makes sure redis-server and redis-cli exist
# (tests start throwaway servers and a local cluster of their own), and that Debian's chromium
# is there (the status page's browser test drives it). Idempotent, and silent when all is fine.
# SERVICES_TIMEOUT (seconds, default 30) bounds each wait.
set -euo pipefail

TIMEOUT=${SERVICES_TIMEOUT:-30}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}

APT_UPDATED=0
PG_INSTALLED=0

say() { printf 'services: %s\n' "$*" >&2; }
die() {
    printf 'services: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# Install Debian packages as root, or say what to do where this script cannot.
# Package scripts are kept from starting services: this script starts them its own way.
apt_install() {
    if [[ $(id -u) -ne 0 ]] || ! have apt-get; then
        die "$* is not installed: install it (Debian/Ubuntu: sudo apt-get install $*)" \
            "or point REDIS_URL / DATABASE_URL at running servers"
    fi
    say "installing $* with apt-get"
    local policy=/usr/sbin/policy-rc.d own_policy=0 status=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        apt-get update -qq >&2 && APT_UPDATED=1 || status=$?
    fi
    if [[ $status -eq 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
            || status=$?
    fi
    [[ $own_policy -eq 0 ]] || rm -f "$policy"
    [[ $status -eq 0 ]] || die "apt-get could not install $* (exit $status)"
}

# Split a URL into URL_HOST, URL_PORT (or the given default) and URL_DB (its path).
parse_url() {
    local re='^[a-z]+://([^@/]*@)?(\[[^]]*\]|[^:/?]*)(:([0-9]+))?(/([^?]*))?(\?.*)?$'
    URL_HOST='' URL_PORT=$2 URL_DB=''
    [[ $1 =~ $re ]] || return 1
    URL_HOST=${BASH_REMATCH[2]}
    URL_PORT=${BASH_REMATCH[4]:-$2}
    URL_DB=${BASH_REMATCH[6]}
}

# Does the URL name this machine's server on the default port? (No host: a local socket.)
is_local_default() {
    parse_url "$1" "$2" || return 1
    [[ $URL_HOST =~ ^(127\.0\.0\.1|localhost|\[::1\])?$ && $URL_PORT == "$2" ]]
}

# Run "$@" until it succeeds, for at most TIMEOUT seconds.
wait_for() {
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# ---------------------------------------------------------------- Redis

# PING over bash's /dev/tcp, for a machine without redis-cli.
redis_ping_tcp() {
    local reply=''
    { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 reply <&3 || true
    exec 3<&- 3>&-
    [[ $reply == "+PONG"* ]]
}

redis_ping_url() {
    if have redis-cli; then
        [[ $(redis-cli --no-auth-warning -u "$REDIS_URL" ping 2>/dev/null) == PONG ]]
    else
        parse_url "$REDIS_URL" 6379 && redis_ping_tcp "${URL_HOST:-127.0.0.1}" "$URL_PORT"
    fi
}

redis_local_ping() {
    if have redis-cli; then
        [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]]
    else
        redis_ping_tcp 127.0.0.1 6379
    fi
}

ensure_redis_binary() {
    have redis-server || apt_install redis-server
    have redis-server || die "redis-server is not on PATH, even after installing it"
    # redis-cli: tests/test_cluster.py joins its local Redis Cluster with `redis-cli --cluster`
    have redis-cli || apt_install redis-tools
    have redis-cli || die "redis-cli is not on PATH, even after installing redis-tools"
}

ensure_redis() {
    if ! is_local_default "$REDIS_URL" 6379; then
        wait_for redis_ping_url || die "Redis at $REDIS_URL does not answer PING after ${TIMEOUT}s"
        return 0
    fi
    redis_local_ping && return 0
    say "starting redis-server on 127.0.0.1:6379"
    # Its working directory is where an explicit SAVE would write: not the caller's checkout.
    local dir=/tmp
    [[ -d /var/lib/redis && -w /var/lib/redis ]] && dir=/var/lib/redis
    (cd "$dir" && redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
        --save "" --appendonly no) >&2 || die "redis-server did not start"
    wait_for redis_local_ping \
        || die "Redis on 127.0.0.1:6379 does not answer PING after ${TIMEOUT}s"
}

# ----------------------------------------------------------- PostgreSQL

# The newest PostgreSQL version that has configuration under /etc/postgresql, e.g. 15.
pg_version() {
    local version
    version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null |
        sort -V | tail -n 1)
    [[ -n $version ]] && printf '%s\n' "$version"
}

pg_local_ready() { pg_isready -q -h 127.0.0.1 -p 5432; }

# One SQL statement as user postgres over loopback TCP, never prompting for a password.
pg_query() {
    psql -X -w -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres -d postgres -c "$1"
}

start_postgres() {
    if ! have pg_ctlcluster || ! pg_version >/dev/null; then
        apt_install postgresql
        PG_INSTALLED=1
    fi
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL on 127.0.0.1:5432 is down: start it as root" \
        "(pg_ctlcluster <version> main start) or set DATABASE_URL"
    local version
    version=$(pg_version) || die "no PostgreSQL cluster under /etc/postgresql"
    if [[ ! -d /etc/postgresql/$version/main ]]; then
        say "creating PostgreSQL cluster $version/main"
        pg_createcluster "$version" main >&2 || die "pg_createcluster $version main failed"
    fi
    say "starting PostgreSQL $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 \
        || die "pg_ctlcluster $version main start failed (see /var/log/postgresql/)"
}

# Trust for user postgres on loopback, only on a server this script has just installed
# (Debian's default asks for a password over TCP). A working server's pg_hba is left alone.
trust_loopback() {
    local version hba
    version=$(pg_version) || die "no PostgreSQL cluster under /etc/postgresql"
    hba=/etc/postgresql/$version/main/pg_hba.conf
    say "allowing trust auth for user postgres on loopback in $hba (was kept as $hba.orig)"
    cp -p "$hba" "$hba.orig"
    {
        printf '# added by streamsink scripts/services.sh for local tests\n'
        printf 'host all postgres 127.0.0.1/32 trust\n'
        printf 'host all postgres ::1/128 trust\n'
        cat "$hba.orig"
    } >"$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >&2 \
        || die "pg_ctlcluster $version main reload failed"
}

ensure_database() {
    local name=$1
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "unexpected database name '$name'"
    [[ -n $(pg_query "SELECT 1 FROM pg_database WHERE datname = '$name'") ]] && return 0
    say "creating database $name"
    pg_query "CREATE DATABASE $name" >&2 || die "could not create database $name"
}

ensure_postgres() {
    if ! is_local_default "$DATABASE_URL" 5432; then
        have pg_isready || apt_install postgresql-client
        wait_for pg_isready -q -d "$DATABASE_URL" \
            || die "PostgreSQL at $DATABASE_URL is not ready after ${TIMEOUT}s"
        return 0
    fi
    local database=${URL_DB:-test}
    if ! { have pg_isready && pg_local_ready; }; then
        start_postgres
        wait_for pg_local_ready \
            || die "PostgreSQL on 127.0.0.1:5432 is not ready after ${TIMEOUT}s"
    fi
    if ! pg_query "SELECT 1" >/dev/null 2>&1; then
        [[ $PG_INSTALLED -eq 1 ]] || die "PostgreSQL on 127.0.0.1:5432 refuses user postgres" \
            "without a password: allow trust for 127.0.0.1 in pg_hba.conf, or set DATABASE_URL"
        trust_loopback
        wait_for pg_query "SELECT 1" \
            || die "PostgreSQL still refuses user postgres on 127.0.0.1 after the reload"
    fi
    ensure_database "$database"
    local reason
    reason=$(psql -X -w -q -c "SELECT 1" "$DATABASE_URL" 2>&1 >/dev/null) \
        || die "cannot connect to $DATABASE_URL: ${reason:-psql failed}"
}

ensure_redis_binary
ensure_redis
ensure_postgres

# The status page is tested in a real browser (tests/ops/test_page.py): Debian's chromium,
# driven by playwright through its executable path (no browser download).
have chromium || apt_install chromium
