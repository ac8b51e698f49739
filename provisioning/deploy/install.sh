#!/bin/sh
# vTPU Cloud one-click deploy: turns this machine into a vTPU node enrolled with the control plane.
#
# Served by the control plane at /enroll/<secret>/install.sh with the four placeholders below
# filled in (control plane URL, one-time enrollment secret, wheel URL, the wheel's sha256); run it
# as the user the agent should run as:
#     curl -fsSL <url>/install.sh | sh
# It installs the runtime wheel in a venv (after checking its sha256), enrolls the node (the secret works once), and starts the
# agent in the background. The agent only calls out (heartbeats), so the node may sit behind NAT.
# Running it again is safe: an enrolled node is not enrolled twice, a running agent is restarted.
#
# Environment: VTPU_NODE_DIR (default ~/.local/share/vtpu/node), VTPU_PORT (default 8470),
# VTPU_HOST (default 127.0.0.1), VTPU_VENV_ARGS (extra `python -m venv` arguments, e.g.
# --system-site-packages on a host whose Python already has numpy and scipy); pip honours its
# own PIP_* variables (PIP_INDEX_URL...).
# Files in the node dir: venv/, state/ (agent.json, node_secret, access_token.sha256; 0600),
# agent.log, agent.pid, run-agent.sh. The same layout and agent command line as provisioning/ (Ansible) uses.
set -eu

CONTROL_PLANE_URL='@CONTROL_PLANE_URL@'
ENROLL_SECRET='@ENROLL_SECRET@'
WHEEL_URL='@WHEEL_URL@'
WHEEL_SHA256='@WHEEL_SHA256@'

NODE_DIR="${VTPU_NODE_DIR:-${HOME:?HOME is not set; set VTPU_NODE_DIR}/.local/share/vtpu/node}"
PORT="${VTPU_PORT:-8470}"
HOST="${VTPU_HOST:-127.0.0.1}"
STATE_DIR="$NODE_DIR/state"
VENV="$NODE_DIR/venv"
PID_FILE="$NODE_DIR/agent.pid"
LOG_FILE="$NODE_DIR/agent.log"
RUN_AGENT="$NODE_DIR/run-agent.sh"
HEALTH_SECONDS=60

say() { printf '==> %s\n' "$*"; }
fail() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

if [ ${#WHEEL_SHA256} -ne 64 ] || [ -n "$(printf '%s' "$WHEEL_SHA256" | tr -d 0-9a-f)" ]; then
    fail "this script holds no valid wheel checksum; fetch it again from the control plane's link"
fi
case "$PORT" in
'' | *[!0-9]*) fail "VTPU_PORT must be a port number, not '$PORT'" ;;
esac
command -v curl >/dev/null 2>&1 || fail "curl is needed (Debian/Ubuntu: sudo apt-get install curl)"

# -- Python -------------------------------------------------------------------------------------
# The wheel holds compiled code for one CPython (its tag, e.g. cp311): find exactly that one.
WHEEL_NAME="${WHEEL_URL##*/}"
WHEEL_NAME="${WHEEL_NAME%%\?*}"
WANT=$(printf '%s\n' "$WHEEL_NAME" | sed -n 's/^[^-]*-[^-]*-cp3\([0-9][0-9]*\)-.*/\1/p')
if [ -n "$WANT" ]; then
    WANT_TEXT="Python 3.$WANT"
    CANDIDATES="python3.$WANT python3"
else
    WANT_TEXT="Python 3.11 or newer"
    CANDIDATES="python3.13 python3.12 python3.11 python3"
fi
PYTHON=""
for candidate in $CANDIDATES; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import sys; want = '$WANT'
ok = sys.version_info[:2] == (3, int(want)) if want else sys.version_info >= (3, 11)
sys.exit(0 if ok else 1)" 2>/dev/null; then
        PYTHON=$(command -v "$candidate")
        break
    fi
done
[ -n "$PYTHON" ] || fail "$WANT_TEXT is needed and was not found. Install it (Debian/Ubuntu: \
sudo apt-get install python3 python3-venv; for another version, e.g. python3.11 python3.11-venv) \
and run this script again"
say "using $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"

# -- venv and wheel -----------------------------------------------------------------------------
mkdir -p "$NODE_DIR"
chmod 700 "$NODE_DIR"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating a virtual environment in $VENV"
    # shellcheck disable=SC2086  # VTPU_VENV_ARGS is a list of arguments
    "$PYTHON" -m venv ${VTPU_VENV_ARGS:-} "$VENV" ||
        fail "cannot create a venv with $PYTHON (Debian/Ubuntu: sudo apt-get install python3-venv)"
fi

# The wheel is installed only when its sha256 is the one this script came with.
sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    else
        "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
            "$1"
    fi
}
WHEEL="$NODE_DIR/$WHEEL_NAME"
if [ -s "$WHEEL" ] && [ "$(sha256_of "$WHEEL")" = "$WHEEL_SHA256" ]; then
    say "runtime wheel already downloaded: $WHEEL_NAME"
else
    say "downloading the vTPU runtime ($WHEEL_NAME)"
    curl -fsSL -o "$WHEEL.part" "$WHEEL_URL" || fail "cannot download $WHEEL_URL"
    GOT_SHA256=$(sha256_of "$WHEEL.part")
    if [ "$GOT_SHA256" != "$WHEEL_SHA256" ]; then
        rm -f "$WHEEL.part"
        fail "the downloaded $WHEEL_NAME is not the wheel the control plane vouched for \
(sha256 $GOT_SHA256, expected $WHEEL_SHA256): it was changed or damaged on the way. Nothing \
was installed; run the install command again, and if this repeats, check the network path \
to $CONTROL_PLANE_URL"
    fi
    mv "$WHEEL.part" "$WHEEL"
fi
say "installing the runtime into the venv (numpy and scipy come with it)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL" ||
    fail "pip could not install $WHEEL_NAME (see above)"

# -- enrollment ---------------------------------------------------------------------------------
say "enrolling with $CONTROL_PLANE_URL"
# The secret goes through the environment, not the command line other users can see in ps.
NODE_ID=$(VTPU_ENROLL_SECRET="$ENROLL_SECRET" "$VENV/bin/vtpu" enroll \
    --control-plane "$CONTROL_PLANE_URL" --node-dir "$NODE_DIR" --host "$HOST" --port "$PORT") ||
    fail "enrollment failed (see above)"
HEARTBEAT_SECONDS=$("$VENV/bin/python" -c \
    'import json, sys; print(json.load(open(sys.argv[1]))["heartbeat_seconds"])' \
    "$STATE_DIR/agent.json")

# -- the agent ----------------------------------------------------------------------------------
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
cat >"$RUN_AGENT.tmp" <<EOF
#!/bin/sh
# Starts the vTPU agent of this node (written by the deploy script; provisioning writes the same).
# Records its pid, then becomes the agent (exec), so agent.pid names the agent itself.
echo "\$\$" > $(quote "$PID_FILE")
exec $(quote "$VENV/bin/vtpu") agent --host $(quote "$HOST") --port $PORT \\
    --state-dir $(quote "$STATE_DIR") --node-secret-file $(quote "$STATE_DIR/node_secret") \\
    --control-plane $(quote "$CONTROL_PLANE_URL") --node-id $(quote "$NODE_ID") \\
    --heartbeat-seconds $HEARTBEAT_SECONDS
EOF
chmod 700 "$RUN_AGENT.tmp"
mv "$RUN_AGENT.tmp" "$RUN_AGENT"

# A pid is ours only while its command line names this node's state dir (pids get reused).
our_agent() {
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "--state-dir $STATE_DIR "
}
# Stop the agent a pid file names, if it is alive and ours: this script's pid file, then the
# agent's own (state/agent.pid), which also covers an agent started some other way.
stop_agent() {
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && our_agent "$pid" || return 0
    say "stopping the running agent (pid $pid) to restart it"
    kill "$pid"
    n=0
    # our_agent too: an exited agent nobody reaped yet (a zombie) still answers kill -0.
    while kill -0 "$pid" 2>/dev/null && our_agent "$pid" && [ $n -lt 30 ]; do
        sleep 0.5
        n=$((n + 1))
    done
    if kill -0 "$pid" 2>/dev/null && our_agent "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
}
stop_agent "$PID_FILE"
stop_agent "$STATE_DIR/agent.pid"
rm -f "$PID_FILE"

say "starting the agent on $HOST:$PORT"
setsid nohup "$RUN_AGENT" >>"$LOG_FILE" 2>&1 </dev/null &
AGENT_PID=$!

case "$HOST" in
0.0.0.0 | 127.0.0.1) HEALTH_HOST=127.0.0.1 ;;
*) HEALTH_HOST="$HOST" ;;
esac
HEALTH_URL="http://$HEALTH_HOST:$PORT/vTPU/health"
say "waiting for $HEALTH_URL"
# Healthy means: the agent that holds this node's state dir (it writes its pid there once it
# owns it) is the one just started, and it answers. Not an older agent, not another service.
i=0
healthy=""
while [ $i -lt $((HEALTH_SECONDS * 2)) ]; do
    STARTED_PID=$(cat "$STATE_DIR/agent.pid" 2>/dev/null || true)
    if [ -n "$STARTED_PID" ] && kill -0 "$STARTED_PID" 2>/dev/null && our_agent "$STARTED_PID" &&
        curl -fsS --max-time 2 -o /dev/null "$HEALTH_URL" 2>/dev/null; then
        healthy=1
        break
    fi
    # setsid may fork (so $! ends at once): give the agent a few seconds to write its pid.
    if [ $i -ge 10 ] && [ -z "$STARTED_PID" ] && ! kill -0 "$AGENT_PID" 2>/dev/null; then
        break
    fi
    sleep 0.5
    i=$((i + 1))
done
if [ -z "$healthy" ]; then
    printf 'error: the agent did not come up; the end of %s:\n' "$LOG_FILE" >&2
    tail -n 30 "$LOG_FILE" >&2 || true
    exit 1
fi
AGENT_PID=$STARTED_PID
echo "$AGENT_PID" >"$PID_FILE"

say "node $NODE_ID is running (pid $AGENT_PID) and reports to $CONTROL_PLANE_URL"
echo "    log:     $LOG_FILE"
echo "    stop it: kill \$(cat '$PID_FILE')"
echo "    start:   setsid nohup '$RUN_AGENT' >> '$LOG_FILE' 2>&1 &"
