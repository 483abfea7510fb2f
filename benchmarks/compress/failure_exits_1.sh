#!/usr/bin/env bash
# A failed measurement (here a bad codec spec) is reported as an error record, the other
# codecs' records still come, and meshtrain-bench-compress exits 1.
#   failure_exits_1.sh PATH/TO/meshtrain-bench-compress
set -u
out=$("$1" --device cpu --bytes 65536 --repeats 1 --codec topk:fraction=2 --codec int8 2>&1)
rc=$?
echo "$out"
[ "$rc" -eq 1 ] || { echo "FAIL: exit $rc, expected 1"; exit 1; }
grep -q '"codec": "topk:fraction=2", "op": "setup", "error":' <<<"$out" || { echo "FAIL: no error record"; exit 1; }
grep -q '"codec": "int8", "op": "decode_accumulate"' <<<"$out" || { echo "FAIL: int8 records missing"; exit 1; }
echo "ok"
