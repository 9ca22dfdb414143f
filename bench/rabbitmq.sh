#!/usr/bin/env bash
# A throwaway, loopback-only RabbitMQ for bench/compare.py: no systemd, no
# management plugin, everything (node name, mnesia, logs, cookie) in a temp
# directory, stopped by PID.
#
#   bench/rabbitmq.sh start     # prints AMQP_URL=amqp://guest:guest@127.0.0.1:PORT/ and STATE=DIR
#   bench/rabbitmq.sh stop      # stops the broker (and the epmd it started) by PID
#   bench/rabbitmq.sh status
#   bench/rabbitmq.sh queues    # how many queues it holds (rabbitmqctl)
#   bench/rabbitmq.sh ctl ARGS  # any rabbitmqctl command against it
#
# State lives in $RABBITMQ_BENCH_STATE (default /tmp/murano-zmq-bench-rabbitmq):
# the PIDs, the port and the data directory.  Needs Debian's rabbitmq-server
# (apt-get install -y rabbitmq-server); it is started directly, not as a service.
set -euo pipefail

STATE=${RABBITMQ_BENCH_STATE:-/tmp/murano-zmq-bench-rabbitmq}
RMQ_BIN=${RABBITMQ_BIN_DIR:-/usr/lib/rabbitmq/bin}
START_TIMEOUT=${RABBITMQ_START_TIMEOUT:-60}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# True once the broker answers the AMQP 0-9-1 protocol header with a frame.
answers() {
    local port=$1 byte=""
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    printf 'AMQP\x00\x00\x09\x01' >&3
    IFS= read -r -t 2 -N 1 byte <&3 || true
    exec 3<&- 3>&-
    [ "$byte" = $'\x01' ]
}

start() {
    if [ ! -x "$RMQ_BIN/rabbitmq-server" ] || ! command -v erl >/dev/null; then
        echo "rabbitmq-server is not installed; on Debian/Ubuntu: apt-get install -y rabbitmq-server" >&2
        echo "(bench/rabbitmq.sh starts it itself; the service need not be enabled)" >&2
        exit 3
    fi
    if [ -f "$STATE/beam.pid" ] && alive "$(cat "$STATE/beam.pid")"; then
        echo "already running: $(cat "$STATE/url")"
        return 0
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE/home" "$STATE/mnesia" "$STATE/log"
    local port dist epmd_port
    port=$(free_port); dist=$(free_port); epmd_port=$(free_port)
    echo "[]." > "$STATE/enabled_plugins"                  # management and the rest: off
    cat > "$STATE/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$port
loopback_users.guest = true
log.console = false
log.file.level = warning
EOF
    : > "$STATE/rabbitmq-env.conf"                         # ignore /etc/rabbitmq/rabbitmq-env.conf

    # Our own epmd on a port of its own, loopback only: stopped with the broker.
    ERL_EPMD_ADDRESS=127.0.0.1 epmd -port "$epmd_port" >"$STATE/log/epmd.log" 2>&1 &
    echo $! > "$STATE/epmd.pid"

    (
        export HOME="$STATE/home"
        export RABBITMQ_CONF_ENV_FILE="$STATE/rabbitmq-env.conf"
        export RABBITMQ_NODENAME="bench-$$@localhost"
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        export RABBITMQ_NODE_PORT="$port"
        export RABBITMQ_DIST_PORT="$dist"
        export RABBITMQ_CONFIG_FILE="$STATE/rabbitmq.conf"
        export RABBITMQ_ENABLED_PLUGINS_FILE="$STATE/enabled_plugins"
        export RABBITMQ_MNESIA_BASE="$STATE/mnesia"
        export RABBITMQ_LOG_BASE="$STATE/log"
        export RABBITMQ_PID_FILE="$STATE/rabbitmq.pid"
        export ERL_EPMD_ADDRESS=127.0.0.1
        export ERL_EPMD_PORT="$epmd_port"
        # The distribution listener: loopback only too.
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        cd "$STATE"
        exec "$RMQ_BIN/rabbitmq-server" >"$STATE/log/stdout.log" 2>&1
    ) &
    echo $! > "$STATE/wrapper.pid"  # rabbitmq-server's script; beam.smp is its child
    echo "$port" > "$STATE/port"
    echo "bench-$$@localhost" > "$STATE/nodename"
    echo "$epmd_port" > "$STATE/epmd_port"
    echo "amqp://guest:guest@127.0.0.1:$port/" > "$STATE/url"

    local deadline=$((SECONDS + START_TIMEOUT))
    until answers "$port"; do
        if ! alive "$(cat "$STATE/wrapper.pid")"; then
            echo "rabbitmq-server exited; its output:" >&2
            tail -n 30 "$STATE/log/stdout.log" >&2 || true
            stop >/dev/null 2>&1 || true
            exit 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "rabbitmq-server did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s" >&2
            stop >/dev/null 2>&1 || true
            exit 1
        fi
        sleep 0.2
    done
    # The broker writes beam.smp's PID there once it has booted.
    cp "$STATE/rabbitmq.pid" "$STATE/beam.pid"
    echo "AMQP_URL=$(cat "$STATE/url")"
    echo "STATE=$STATE"
}

stop_pid() {  # stop_pid FILE: SIGTERM, wait up to 30 s, then SIGKILL
    local pid
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 300); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

stop() {
    stop_pid "$STATE/beam.pid"
    stop_pid "$STATE/wrapper.pid"
    stop_pid "$STATE/epmd.pid"
    echo "stopped"
}

status() {
    if [ -f "$STATE/beam.pid" ] && alive "$(cat "$STATE/beam.pid")"; then
        echo "running: $(cat "$STATE/url") pid $(cat "$STATE/beam.pid")"
    else
        echo "not running"
        return 1
    fi
}

# rabbitmqctl against this broker (the cookie is in $STATE/home).
ctl() {
    HOME="$STATE/home" ERL_EPMD_PORT=$(cat "$STATE/epmd_port") ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_CONF_ENV_FILE="$STATE/rabbitmq-env.conf" \
        "$RMQ_BIN/rabbitmqctl" -n "$(cat "$STATE/nodename")" "$@"
}

case "${1:-}" in
    queues) ctl list_queues -q --no-table-headers name | grep -c . || true ;;
    ctl) shift; ctl "$@" ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status|queues|ctl ARGS" >&2; exit 2 ;;
esac
