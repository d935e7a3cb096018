#!/usr/bin/env bash
# Create the upload stream (if missing) and the durable pull consumer the daemon reads from.
#
#   ./setup-nats-consumer.sh [CONSUMER]     # CONSUMER: the durable name (default NATS_CONSUMER_NAME)
#
# Several consumers on one stream (process, notify, archive) each get their own: run it once per name.
# With the `nats` CLI installed, it is used with the same settings the daemon would choose:
#   --ack explicit --pull --deliver all --max-deliver=-1 --max-pending=100 --wait=30s --replay instant
# Without it, `uploads-consumer setup` does the same (and also creates the dead-letter stream,
# the results stream and the idempotency bucket, which the daemon otherwise creates at start).
# Either way it is idempotent: what exists is reported and left as it is.
#
# Environment (the daemon's own variables, same defaults):
#   NATS_URL                     nats://localhost:4222 (comma-separated; may embed user:pass@)
#   NATS_USER, NATS_PASSWORD     user/password          NATS_TOKEN   token
#   NATS_CREDS, NATS_NKEY        .creds / nkey seed file
#   NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY
#   NATS_STREAM_NAME=FILE_UPLOADS  NATS_SUBJECT=file.uploads  NATS_CONSUMER_NAME=file_processor
#   ACK_WAIT=30s  MAX_ACK_PENDING=100  NATS_REPLICAS=1
# The consumer is always created with --max-deliver=-1: once a server-side limit is reached the
# server drops a message silently, so MAX_DELIVER is enforced by the daemon (a dead-letter copy).
# The stream keeps 7 days of uploads (limits retention, file storage, discard old) and also captures
# SUBJECT.replay.>; each consumer also filters its own SUBJECT.replay.CONSUMER, where
# `uploads-consumer dlq replay` puts back what that consumer (and no other) dead-lettered.
#
# Exit status: 0 when the stream and consumer exist afterwards, non-zero otherwise.
set -euo pipefail

usage() {
    sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi
if [[ $# -gt 1 ]]; then
    echo "setup-nats-consumer.sh: takes at most one argument, the consumer name (see --help)" >&2
    exit 2
fi

# `${X:-default}`: an exported but empty variable counts as unset, as it does for the daemon.
nats_url="${NATS_URL:-nats://localhost:4222}"
stream="${NATS_STREAM_NAME:-FILE_UPLOADS}"
subject="${NATS_SUBJECT:-file.uploads}"
consumer="${1:-${NATS_CONSUMER_NAME:-file_processor}}"
if [[ ! "$consumer" =~ ^[^[:space:].*\>/\\]+$ ]]; then
    printf "setup-nats-consumer.sh: consumer name '%s' must not contain spaces, '.', '*', '>', '/' or a backslash\n" "$consumer" >&2
    exit 2
fi
export NATS_CONSUMER_NAME="$consumer"  # for the uploads-consumer fallback
ack_wait="${ACK_WAIT:-30s}"
max_ack_pending="${MAX_ACK_PENDING:-100}"
replicas="${NATS_REPLICAS:-1}"

# The daemon accepts plain seconds for durations; the nats CLI wants a unit.
if [[ "$ack_wait" =~ ^[0-9]+$ ]]; then
    ack_wait="${ack_wait}s"
fi

setup_with_uploads_consumer() {
    echo "nats CLI not found; using 'uploads-consumer setup'"
    if command -v uploads-consumer >/dev/null 2>&1; then
        exec uploads-consumer setup
    fi
    for python in python3 python; do
        if command -v "$python" >/dev/null 2>&1 && "$python" -c 'import uploads_consumer' >/dev/null 2>&1; then
            exec "$python" -m uploads_consumer setup
        fi
    done
    echo "setup-nats-consumer.sh: neither the nats CLI nor uploads-consumer is installed;" \
         "install one (https://github.com/nats-io/natscli, or: pip install uploads-consumer)" >&2
    exit 1
}

if ! command -v nats >/dev/null 2>&1; then
    setup_with_uploads_consumer
fi

# Connection flags for the nats CLI. Note that flags are visible in the process list while
# the CLI runs; a .creds file (NATS_CREDS) avoids putting a secret there.
conn=(--server "$nats_url")
if [[ -n "${NATS_USER:-}" ]]; then
    conn+=(--user "$NATS_USER")
    if [[ -n "${NATS_PASSWORD:-}" ]]; then
        conn+=(--password "$NATS_PASSWORD")
    fi
elif [[ -n "${NATS_TOKEN:-}" ]]; then
    conn+=(--user "$NATS_TOKEN")  # the nats CLI takes a token as --user without --password
fi
if [[ -n "${NATS_CREDS:-}" ]]; then
    conn+=(--creds "$NATS_CREDS")
fi
if [[ -n "${NATS_NKEY:-}" ]]; then
    conn+=(--nkey "$NATS_NKEY")
fi
if [[ -n "${NATS_TLS_CA:-}" ]]; then
    conn+=(--tlsca "$NATS_TLS_CA")
fi
if [[ -n "${NATS_TLS_CERT:-}" ]]; then
    conn+=(--tlscert "$NATS_TLS_CERT")
fi
if [[ -n "${NATS_TLS_KEY:-}" ]]; then
    conn+=(--tlskey "$NATS_TLS_KEY")
fi

filters=(--filter "$subject" --filter "$subject.replay.$consumer")
if nats "${conn[@]}" stream info "$stream" >/dev/null 2>&1 </dev/null; then
    echo "found   stream $stream"
    # Made elsewhere (the backend makes it with file.uploads alone): a filter on a subject the stream
    # does not capture would be refused, so the consumer reads the uploads only.
    filters=(--filter "$subject")
    echo "note: for \`dlq replay\` to reach only this consumer, run \`uploads-consumer setup --enable-replay\`"
else
    nats "${conn[@]}" stream add "$stream" \
        --subjects "$subject" --subjects "$subject.replay.>" \
        --storage file --retention limits --discard old --max-age=7d \
        --replicas "$replicas" --defaults </dev/null >/dev/null
    echo "created stream $stream (subjects $subject, $subject.replay.>)"
fi

if nats "${conn[@]}" consumer info "$stream" "$consumer" >/dev/null 2>&1 </dev/null; then
    # Never changed here: the daemon reads the consumer's own ack_wait and max_deliver as they are.
    echo "found   consumer $consumer on $stream (left as it is)"
else
    nats "${conn[@]}" consumer add "$stream" "$consumer" \
        "${filters[@]}" \
        --ack explicit --pull --deliver all \
        "--max-deliver=-1" "--max-pending=$max_ack_pending" "--wait=$ack_wait" \
        --replay instant --defaults </dev/null >/dev/null
    echo "created consumer $consumer on $stream (pull, ack explicit, ack wait $ack_wait," \
         "max ack pending $max_ack_pending; MAX_DELIVER is enforced by the daemon)"
fi
