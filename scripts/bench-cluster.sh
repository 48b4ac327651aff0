#!/usr/bin/env bash
# Measures `courier bench` against brokers in their own processes: one node
# on sled, one node on Redis, or several nodes sharing one Redis. Prints the
# bench's JSON line and the CPU the brokers (and redis-server) used per
# delivered message.
#
#   scripts/bench-cluster.sh sled  1 durable -n 100000
#   scripts/bench-cluster.sh redis 1 durable -n 100000
#   scripts/bench-cluster.sh redis 3 fanout -n 20000 -c 100
#
# Arguments: backend (sled | redis), node count, then everything after is
# passed to `courier bench` (workload first). Needs a release build
# (`cargo build --release`) and, for redis, `redis-server` on the PATH.
# REDIS_FSYNC (always | everysec | no; default always) sets Redis' AOF
# `appendfsync`.
set -euo pipefail

backend=${1:?backend: sled or redis}
nodes=${2:?node count}
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
courier="$root/target/release/courier"
[ -x "$courier" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# CPU seconds (user + system) a process has used so far.
cpu_of() {
    awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

# The bench's own broker runs without rate limits; so do these.
limits='[limits]
publish_per_sec = 1000000000
publish_burst = 1000000000
publish_bytes_per_sec = 1000000000
user_publish_per_sec = 1000000000
user_publish_bytes_per_sec = 1000000000
subscribe_per_sec = 1000000000
subscribe_burst = 1000000000
max_subscriptions = 1000000000
max_connections_per_user = 4000000000
max_connections_per_ip = 4000000000
abuse_violations = 4000000000'
config="$work/courier.toml"
{
    echo '[server]'
    echo 'fsync = "batch"'
    if [ "$backend" = redis ]; then
        port=$(free_port)
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly yes \
            --appendfsync "${REDIS_FSYNC:-always}" --dir "$work" >"$work/redis.log" 2>&1 &
        pids+=($!)
        redis_pid=$!
        until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
        echo '[storage]'
        echo 'backend = "redis"'
        echo "redis_url = \"redis://127.0.0.1:$port/\""
    fi
    echo "$limits"
} >"$config"

urls=()
brokers=()
for i in $(seq 1 "$nodes"); do
    dir="$work/node$i"
    mkdir -p "$dir"
    "$courier" serve --config "$config" --data-dir "$dir/data" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$dir/log" 2>&1 &
    pid=$!
    pids+=("$pid")
    brokers+=("$pid")
    until grep -q 'courier listening' "$dir/log"; do sleep 0.05; done
    addr=$(grep -o 'addr=[0-9.:]*' "$dir/log" | head -1 | cut -d= -f2)
    urls+=("ws://$addr/ws")
done

brokers_cpu() {
    local total=0
    for pid in "${brokers[@]}"; do total=$(awk -v a="$total" -v b="$(cpu_of "$pid")" 'BEGIN { print a + b }'); done
    echo "$total"
}
before=$(brokers_cpu)
redis_before=0
[ -n "${redis_pid:-}" ] && redis_before=$(cpu_of "$redis_pid")

url_list=$(IFS=,; echo "${urls[*]}")
"$courier" bench "$@" --url "$url_list" --json | tee "$work/bench.out"

after=$(brokers_cpu)
redis_after=0
[ -n "${redis_pid:-}" ] && redis_after=$(cpu_of "$redis_pid")
deliveries=$(tail -1 "$work/bench.out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["deliveries"])')
python3 - "$before" "$after" "$redis_before" "$redis_after" "$deliveries" "$backend" "$nodes" <<'EOF'
import sys
b, a, rb, ra, n = (float(x) for x in sys.argv[1:6])
print(f"{sys.argv[6]} x{sys.argv[7]}: brokers {a - b:.2f} CPU s, redis {ra - rb:.2f} CPU s, "
      f"{(a - b + ra - rb) / n * 1e6:.1f} CPU µs per delivered message ({int(n)} deliveries)")
EOF
