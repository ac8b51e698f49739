# Sourced by scripts/run and scripts/test: Debian packages the platform needs on this machine.
# As root on Debian they are installed when missing; otherwise we say what to install.
ensure_debian_packages() {
    local missing=()
    local pkg bin
    for pair in "$@"; do
        pkg="${pair%%:*}"
        bin="${pair#*:}"
        command -v "$bin" >/dev/null 2>&1 || [ -x "$bin" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${missing[*]} (apt-get)" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "error: missing ${missing[*]}; install them (apt-get install ${missing[*]})" >&2
        exit 1
    fi
}

# PostgreSQL when one answers on 127.0.0.1:5432 and DATABASE_URL is not set; else SQLite.
default_database_url() {
    if [ -z "${DATABASE_URL:-}" ] && command -v pg_isready >/dev/null 2>&1 &&
        pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        export DATABASE_URL="postgres://postgres@127.0.0.1:5432/vtpu"
    fi
}
