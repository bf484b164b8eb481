# Shared helpers for the scripts in scripts/cluster (sourced, not run).
# Defines: $cluster_dir (this directory), $repo (the repository root), and the functions below.
# shellcheck shell=bash disable=SC2034 # variables for the scripts that source this

cluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$cluster_dir/../.." && pwd)"

# Exit code meaning "cannot run here" (not root, a tool missing, namespaces not permitted):
# callers (the tests) report it as a skip, with the reason printed on stderr.
SKIP=77

# The name of the calling script, for messages.
me="$(basename "$0")"

die() {
    echo "$me: error: $*" >&2
    exit 1
}

skip() {
    echo "$me: SKIP: $*" >&2
    exit "$SKIP"
}

need_root() {
    [ "$(id -u)" -eq 0 ] || skip "needs root (uid $(id -u)): $1"
}

need_commands() {
    local missing=()
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    [ ${#missing[@]} -eq 0 ] || skip "not installed: ${missing[*]} (run scripts/install-deps)"
}

# The last lines of a log file, indented, for failure messages.
log_tail() {
    local file=$1 lines=${2:-15}
    if [ -s "$file" ]; then
        echo "--- last $lines lines of $file:" >&2
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
    else
        echo "--- $file is empty or missing" >&2
    fi
}

# Whether process $1 exists and is not a zombie.
running() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
    [ -n "$state" ] && [ "$state" != Z ]
}

# Whether the process in pid file $1 is alive (not a zombie) and runs program $2 (so that a
# recycled pid is never taken for ours).
pid_alive() {
    local file=$1 comm=$2 pid
    [ -s "$file" ] || return 1
    pid="$(cat "$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$comm" ] && running "$pid"
}

# Stops the process in pid file $1 if it is program $2: SIGTERM, then SIGKILL after $3 seconds
# (default 10). Removes the pid file. Safe when it is not running.
stop_pid() {
    local file=$1 comm=$2 grace=${3:-10} pid
    if pid_alive "$file" "$comm"; then
        pid="$(cat "$file")"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + grace))
        while running "$pid" && [ $SECONDS -lt "$deadline" ]; do
            sleep 0.05
        done
        if running "$pid"; then
            echo "$me: $comm (pid $pid) ignored SIGTERM for ${grace}s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while running "$pid" && [ $SECONDS -lt "$deadline" ]; do
                sleep 0.05
            done
        fi
    fi
    rm -f "$file"
}

# The session id of process $1 (empty if it is gone).
session_of() {
    sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $4}' || true
}

# Sends signal $2 to every process of session $1.
signal_session() {
    local sid=$1 sig=$2 p
    for p in /proc/[0-9]*; do
        [ "$(session_of "${p#/proc/}")" = "$sid" ] && kill "-$sig" "${p#/proc/}" 2>/dev/null
    done
    return 0
}
