# Sourced by scripts/run and scripts/test: makes .venv with Python 3.11 and installs this
# repository into it (editable, so the Cython extensions build in place) with the given extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VTPU_VENV:-$ROOT/.venv}"

find_python() {
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    echo "error: Python 3.11 not found (install it: apt-get install python3.11 python3.11-venv)" >&2
    exit 1
}

ensure_venv() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(find_python)"
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            # Debian splits venv out of the interpreter package.
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                apt-get update -qq && apt-get install -y -qq python3.11-venv >/dev/null
                "$py" -m venv "$VENV"
            else
                echo "error: cannot create a virtualenv; install python3.11-venv" >&2
                exit 1
            fi
        fi
        "$VENV/bin/python" -m pip install -q --upgrade "pip==26.3"
    fi
    # C compiler with OpenMP: present on our machines; a bare Debian needs build-essential.
    if ! command -v cc >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq build-essential python3.11-dev >/dev/null
        else
            echo "error: no C compiler; install build-essential and python3.11-dev" >&2
            exit 1
        fi
    fi
    # The install is editable, so Python changes need nothing; reinstall (and recompile) only
    # when the build inputs changed, or an extra is asked for that is not installed yet.
    local inputs installed="" wanted
    inputs="$(cd "$ROOT" && cat pyproject.toml setup.py \
        $(find runtime -name '*.pyx' -o -name '*.pxd' -o -name '*.h' | sort) | sha256sum)"
    if [ -f "$VENV/.vtpu-install" ] && [ "$(head -n 1 "$VENV/.vtpu-install")" = "$inputs" ]; then
        installed="$(tail -n +2 "$VENV/.vtpu-install")"
        local missing=0
        for wanted in ${extras//,/ }; do
            printf '%s\n' "$installed" | grep -qx "$wanted" || missing=1
        done
        [ "$missing" = 0 ] && return 0
    fi
    local all
    all="$(printf '%s\n' $installed ${extras//,/ } | sort -u | paste -sd, -)"
    echo "==> installing vtpu${all:+[$all]} into $VENV (builds the Cython runtime)" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT${all:+[$all]}"
    printf '%s\n' "$inputs" ${all//,/ } > "$VENV/.vtpu-install"
}
