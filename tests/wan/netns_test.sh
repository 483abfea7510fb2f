#!/usr/bin/env bash
# wan_netns: brings up 2 shaped hosts with benchmarks/wan/netns.sh, moves 4 MiB over TCP from
# host 0 to host 1, checks it arrived intact, and tears down (always, via trap). Exits 77 (ctest
# SKIP) with netns.sh check's reason when network namespaces are unavailable here.
#   netns_test.sh /path/to/netns.sh
set -euo pipefail

NETNS_SH="${1:?usage: netns_test.sh /path/to/netns.sh}"
PYTHON="${PYTHON:-python3}"

rc=0
reason=$("$NETNS_SH" check 2>&1) || rc=$?
echo "$reason"
if [[ $rc -eq 77 ]]; then echo "wan_netns: SKIP"; exit 77; fi
if [[ $rc -ne 0 ]]; then echo "wan_netns: FAIL: netns.sh check exited $rc"; exit "$rc"; fi
command -v "$PYTHON" >/dev/null 2>&1 || { echo "wan_netns: SKIP: $PYTHON not found (needed for the transfer)"; exit 77; }

# A prefix of our own, so concurrent runs and a developer's own 'mt' hosts are left alone.
PREFIX="mtt$$"
export MT_NETNS_PREFIX="$PREFIX"
WORK=$(mktemp -d)
cleanup() {
  local rc=$?
  if [[ -n "${SERVER_PID:-}" ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  "$NETNS_SH" down 2 "$PREFIX" || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$NETNS_SH" up 2 100 "$PREFIX"

# Server in host 1 (10.77.0.2): receive until EOF, write the byte count and sha256 to a file.
cat >"$WORK/server.py" <<'PY'
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.77.0.2", 5201)); s.listen(1)
open(sys.argv[2], "w").write("ready\n")
s.settimeout(30); c, _ = s.accept(); c.settimeout(30)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
c.sendall(b"ok"); c.close()
open(sys.argv[1], "w").write(f"{n} {h.hexdigest()}\n")
PY
# Client in host 0 (10.77.0.1): send a deterministic 4 MiB payload, report its hash and time.
cat >"$WORK/client.py" <<'PY'
import hashlib, socket, sys, time
data = hashlib.sha256(b"meshtrain").digest() * (4 * 1024 * 1024 // 32)
c = socket.create_connection(("10.77.0.2", 5201), timeout=30)
t0 = time.monotonic(); c.sendall(data); c.shutdown(socket.SHUT_WR)
assert c.recv(2) == b"ok"; dt = time.monotonic() - t0
print(f"{len(data)} {hashlib.sha256(data).hexdigest()} {dt:.3f}")
PY

"$NETNS_SH" exec 1 "$PYTHON" "$WORK/server.py" "$WORK/result" "$WORK/ready" &
SERVER_PID=$!
for _ in $(seq 100); do [[ -s "$WORK/ready" ]] && break; sleep 0.1; done
[[ -s "$WORK/ready" ]] || { echo "wan_netns: FAIL: server in ${PREFIX}h1 did not start"; exit 1; }

read -r sent_n sent_hash secs < <("$NETNS_SH" exec 0 timeout 60 "$PYTHON" "$WORK/client.py")
wait "$SERVER_PID"
SERVER_PID=""
read -r got_n got_hash <"$WORK/result"
echo "wan_netns: host0 -> host1: sent $sent_n B in $secs s (upload shaped to 100 mbit); host1 got $got_n B"
if [[ "$sent_n" != "$got_n" || "$sent_hash" != "$got_hash" ]]; then
  echo "wan_netns: FAIL: payload differs (sent $sent_n $sent_hash, got $got_n $got_hash)"
  exit 1
fi
echo "wan_netns: PASS"
