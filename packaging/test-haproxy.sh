#!/usr/bin/env bash
# Two gptossd daemons behind a real HAProxy, configured by packaging/haproxy/gptossd.cfg as
# shipped (only its three addresses changed to loopback ports), all on 127.0.0.1:
#
#   1. stickiness: 16 different system prompts, each sent twice one after the other: each
#      prompt's two requests reach the same daemon, and both daemons get some;
#   2. a drain under load: 60 chat requests (half streamed), 6 at a time; once 15 have
#      completed and requests for gpu1 are under way, the daemon gpu1 gets SIGTERM. Every
#      request must get a 200 and a well-formed completion (whole: a chat.completion with a
#      choice, finish_reason and usage; streamed: chat.completion.chunk events, a
#      finish_reason, then [DONE]); at least one must have been running on gpu1 at the SIGTERM
#      and finished there (the drain); gpu1 must exit 0, HAProxy must mark it DOWN, and gpu2
#      must stay healthy. How many requests HAProxy replayed is printed from its statistics.
#
# Installs nothing: needs haproxy (Debian's package), python3 (standard library only) and the
# built daemon (target/release/gptossd and gptossd-stage, or $GPTOSSD_BIN). Stops every
# process it started and removes its files, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${GPTOSSD_BIN:-target/release/gptossd}
shipped=packaging/haproxy/gptossd.cfg

fail() {
    printf 'FAILED: %s\n' "$*" >&2
    exit 1
}
for tool in haproxy python3 "$bin"; do
    command -v "$tool" >/dev/null || fail "$tool is missing (haproxy: apt-get install haproxy; gptossd: cargo build --release)"
done

work=$(mktemp -d)
pids=()
cleanup() {
    local rc=$? pid
    trap - EXIT
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        for log in "$work"/*.log; do
            [ -f "$log" ] && { echo "--- last lines of $(basename "$log")"; tail -n 15 "$log"; }
        done >&2
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# Waits (at most $2 s) until command $1 succeeds.
wait_for() {
    local _
    for _ in $(seq $(($2 * 10))); do
        eval "$1" && return 0
        sleep 0.1
    done
    return 1
}
health() { python3 -c "
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)"; }

"$bin" make-test-model --preset tiny --out "$work/tiny" >"$work/make-test-model.log" 2>&1

# A daemon on a port of its choosing (port 0): its log says which.
declare -A port pid
start_daemon() {
    local name=$1
    cat >"$work/$name.toml" <<EOF
[server]
port = 0
control_socket = "$work/$name.sock"

[[models]]
name = "tiny"
path = "$work/tiny"
stages = 1
threads_per_stage = 1
EOF
    "$bin" serve --config "$work/$name.toml" 2>"$work/$name.log" &
    pid[$name]=$!
    pids+=("$!")
    wait_for "grep -q 'listening on http://127.0.0.1:' '$work/$name.log'" 30 ||
        fail "$name did not start listening"
    port[$name]=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$work/$name.log" | grep -o '[0-9]*$')
}
start_daemon gpu1
start_daemon gpu2
wait_for "health ${port[gpu1]} && health ${port[gpu2]}" 60 || fail "the daemons did not become healthy"
echo "ok: gptossd gpu1 on 127.0.0.1:${port[gpu1]} (pid ${pid[gpu1]}), gpu2 on 127.0.0.1:${port[gpu2]} (pid ${pid[gpu2]})"

# HAProxy: a global section with a log (to haproxy.log) and a stats socket, Debian's defaults,
# then the shipped file with its addresses changed, and nothing else.
lb_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/global.cfg" <<EOF
global
    log stdout format raw local0
    stats socket $work/haproxy.sock mode 600 level admin

defaults
    mode http
    option httplog
    timeout connect 5s
    timeout client 50s
    timeout server 50s
EOF
sed -e "s/^    bind 127\.0\.0\.1:8000$/    bind 127.0.0.1:$lb_port/" \
    -e "s/^    server gpu1 192\.0\.2\.11:8080$/    server gpu1 127.0.0.1:${port[gpu1]}/" \
    -e "s/^    server gpu2 192\.0\.2\.12:8080$/    server gpu2 127.0.0.1:${port[gpu2]}/" \
    "$shipped" >"$work/gptossd.cfg"
changed=$(diff "$shipped" "$work/gptossd.cfg" | grep -c '^>' || true)
[ "$changed" = 3 ] || fail "expected to change the bind and the two server lines of $shipped, changed $changed"
haproxy -c -f "$work/global.cfg" -f "$work/gptossd.cfg" >"$work/check.out" 2>&1 || {
    cat "$work/check.out"
    fail "haproxy -c rejects the configuration"
}
grep -i warning "$work/check.out" && fail "haproxy -c warns about the configuration"
haproxy -db -f "$work/global.cfg" -f "$work/gptossd.cfg" >"$work/haproxy.log" 2>&1 &
pids+=("$!")
echo "ok: haproxy $(haproxy -v | awk 'NR == 1 { print $3 }') on 127.0.0.1:$lb_port with $shipped"

python3 - "$lb_port" "${pid[gpu1]}" "$work/haproxy.sock" <<'EOF'
"""The load: stickiness first, then a drain of gpu1 under load. Exits non-zero on a failure."""
import http.client, json, os, signal, socket, sys, threading, time
from concurrent.futures import ThreadPoolExecutor

lb_port, victim, stats_sock = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
KEYS = [f"You are assistant number {k}. Answer briefly." for k in range(16)]


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def stats():
    """HAProxy's `show stat`: {(proxy, server): row}."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(stats_sock)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(head, l.split(","))) for l in lines[1:] if l]
    return {(r["pxname"], r["svname"]): r for r in rows}


def wait_status(server, want, limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        if stats()[("gptossd", server)]["status"].startswith(want):
            return True
        time.sleep(0.2)
    return False


def chat(key, stream, max_tokens):
    """One request through HAProxy; returns (server, problem or None)."""
    body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "system", "content": key}, {"role": "user", "content": "Hello"}]}
    conn = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        server = resp.getheader("x-gptossd-server")
        if resp.status != 200:
            return server, f"HTTP {resp.status}: {text[:200]}"
        if server is None:
            return server, "no x-gptossd-server header"
        if not stream:
            c = json.loads(text)
            ok = (c["object"] == "chat.completion" and c["model"] == "tiny"
                  and c["choices"][0]["message"]["role"] == "assistant"
                  and c["choices"][0]["finish_reason"] in ("length", "stop")
                  and c["usage"]["completion_tokens"] >= 1)
            return server, None if ok else f"malformed completion: {text[:200]}"
        events = [l[len("data: "):] for l in text.splitlines() if l.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return server, f"stream does not end with [DONE]: {text[-200:]}"
        chunks = [json.loads(e) for e in events[:-1]]
        ok = (chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
              and any(ch["finish_reason"] for c in chunks for ch in c["choices"]))
        return server, None if ok else f"malformed stream: {text[:200]}"
    except Exception as e:  # a reset, a timeout, bad JSON: all failures of this request
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


for s in ("gpu1", "gpu2"):
    if not wait_status(s, "UP", 20):
        fail(f"haproxy does not see {s} UP")
print("ok: haproxy's health checks see gpu1 and gpu2 UP")

# 1. Stickiness: one request at a time (no load to balance), each key twice.
where = {}
for key in KEYS:
    got = []
    for _ in range(2):
        server, problem = chat(key, False, 4)
        if problem:
            fail(f"sticky phase: {problem}")
        got.append(server)
    if got[0] != got[1]:
        fail(f"one system prompt went to {got[0]} and then {got[1]}")
    where[key] = got[0]
spread = {s: sum(1 for v in where.values() if v == s) for s in ("gpu1", "gpu2")}
if 0 in spread.values():
    fail(f"every system prompt hashed to one daemon: {spread}")
print(f"ok: each of 16 system prompts stuck to one daemon (gpu1: {spread['gpu1']}, gpu2: {spread['gpu2']})")

# 2. The drain: 60 requests, 6 at a time. Once 15 have completed and at least two requests
# whose system prompt hashes to gpu1 are under way, gpu1 gets SIGTERM.
TOTAL, CONCURRENCY, KILL_AFTER, MAX_TOKENS = 60, 6, 15, 64
cond = threading.Condition()
done, done_at_kill, killed_at, results, in_flight = 0, None, None, [], {}


def one(i):
    global done
    key = KEYS[i % len(KEYS)]
    with cond:
        in_flight[i] = where[key]
        cond.notify_all()
    start = time.time()
    server, problem = chat(key, i % 2 == 0, MAX_TOKENS)
    with cond:
        del in_flight[i]
        results.append((i, start, time.time(), server, problem))
        done += 1
        cond.notify_all()


def killer():
    global killed_at, done_at_kill
    with cond:
        cond.wait_for(lambda: done >= KILL_AFTER
                      and sum(1 for s in in_flight.values() if s == "gpu1") >= 2, timeout=60)
    time.sleep(0.05)  # let those requests reach gpu1 and start generating
    with cond:
        os.kill(victim, signal.SIGTERM)
        killed_at, done_at_kill = time.time(), done


before = stats()[("gptossd", "BACKEND")]
kill_thread = threading.Thread(target=killer)
kill_thread.start()
with ThreadPoolExecutor(CONCURRENCY) as pool:
    list(pool.map(one, range(TOTAL)))
kill_thread.join()
after = stats()[("gptossd", "BACKEND")]

bad = [(i, p) for i, _, _, _, p in results if p]
for i, p in bad:
    print(f"request {i}: {p}", file=sys.stderr)
if bad:
    fail(f"{len(bad)} of {TOTAL} requests failed")
if killed_at is None:
    fail("gpu1 was never sent SIGTERM")
count = lambda pred: sum(1 for r in results if pred(r))
drained = count(lambda r: r[3] == "gpu1" and r[1] < killed_at < r[2])
print(f"ok: all {TOTAL} requests got 200 and a well-formed completion (whole and streamed); "
      f"gpu1 got SIGTERM after {done_at_kill} had completed")
print(f"    gpu1 served {count(lambda r: r[3] == 'gpu1')}, {drained} of them running at the SIGTERM "
      f"(finished during its drain); gpu2 served {count(lambda r: r[3] == 'gpu2')}, "
      f"{count(lambda r: r[3] == 'gpu2' and r[1] >= killed_at)} of them sent after the SIGTERM")
print(f"    haproxy retried {int(after['wretr']) - int(before['wretr'])} times and redispatched "
      f"{int(after['wredis']) - int(before['wredis'])} requests to the other daemon")
if drained == 0:
    fail("no request was running on gpu1 at the SIGTERM: the drain was not exercised")
if not wait_status("gpu1", "DOWN", 15):
    fail("haproxy still sends to gpu1 after its drain")
if not wait_status("gpu2", "UP", 1):
    fail("gpu2 is not UP")
print("ok: haproxy marked gpu1 DOWN; gpu2 stays UP")
EOF

# gpu1 drained and exited 0; gpu2 still serves.
wait_for "! kill -0 ${pid[gpu1]} 2>/dev/null" 40 || fail "gpu1 did not exit after SIGTERM"
rc=0
wait "${pid[gpu1]}" || rc=$?
# Reaped: its id may be reused, so cleanup must not signal it.
kept=()
for p in "${pids[@]}"; do
    [ "$p" = "${pid[gpu1]}" ] || kept+=("$p")
done
pids=("${kept[@]}")
[ "$rc" = 0 ] || fail "gpu1 exited $rc after SIGTERM (a drain exits 0)"
grep -q 'draining' "$work/gpu1.log" || fail "gpu1's log does not say it drained"
echo "ok: gpu1 drained and exited 0"
health "${port[gpu2]}" || fail "gpu2 is not healthy"
echo "ok: gpu2 is healthy"
echo
echo "All HAProxy checks passed."
