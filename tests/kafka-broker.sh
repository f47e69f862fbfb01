#!/usr/bin/env bash
# A local Kafka-compatible broker for Lethe's tests and for trying the Kafka
# deployment on one machine: Tansu (a Kafka-compatible broker published on
# crates.io), in memory, on 127.0.0.1:9092. Lethe itself depends on nothing
# Tansu-specific; any Kafka works (see config/examples/production.toml).
#
#   tests/kafka-broker.sh start    install if missing (a long build, once), start, wait until it answers
#   tests/kafka-broker.sh stop     stop the broker started here
#   tests/kafka-broker.sh status   exit 0 if something listens on the address
#
# LETHE_KAFKA_ADDR overrides the address (host:port).
set -euo pipefail

ADDR="${LETHE_KAFKA_ADDR:-127.0.0.1:9092}"
HOST="${ADDR%:*}"
PORT="${ADDR##*:}"
RUN_DIR="${TMPDIR:-/tmp}/lethe-kafka-broker"
PID_FILE="$RUN_DIR/tansu.pid"
LOG_FILE="$RUN_DIR/tansu.log"
TANSU_VERSION="0.6.0"

listening() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

install() {
    if command -v tansu >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/tansu" ]; then
        return
    fi
    echo "installing tansu $TANSU_VERSION (with the in-memory engine); this build takes a while" >&2
    cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked
}

start() {
    if listening; then
        echo "a broker already listens on $ADDR" >&2
        return
    fi
    install
    mkdir -p "$RUN_DIR"
    local bin
    bin="$(command -v tansu || echo "$HOME/.cargo/bin/tansu")"
    nohup "$bin" broker \
        --listener-url "tcp://$ADDR" \
        --advertised-listener-url "tcp://$ADDR" \
        --storage-engine "memory://tansu/" >"$LOG_FILE" 2>&1 &
    echo $! >"$PID_FILE"
    for _ in $(seq 1 60); do
        if listening; then
            echo "broker listening on $ADDR (pid $(cat "$PID_FILE"), log $LOG_FILE)" >&2
            return
        fi
        sleep 0.5
    done
    echo "the broker did not start; its log:" >&2
    cat "$LOG_FILE" >&2
    exit 1
}

stop() {
    if [ -f "$PID_FILE" ]; then
        pid="$(cat "$PID_FILE")"
        kill "$pid" 2>/dev/null || true
        # A broker holding gigabytes takes a while to exit; a start must not
        # find the old one still listening and take it for the new one.
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$PID_FILE"
    fi
    for _ in $(seq 1 20); do
        listening || return 0
        sleep 0.5
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) listening ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
