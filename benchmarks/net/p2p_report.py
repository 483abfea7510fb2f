#!/usr/bin/env python3
"""Prints p2p_bench JSON as a table: median GB/s per case and its ratio to raw TCP of the
same size measured in the same run."""
import json
import sys


def main(path):
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b.get("run_name", b["name"]).split("/real_time")[0]
        parts = name.split("/")
        kind, size = parts[0].replace("BM_", ""), int(parts[1])
        streams = int(parts[2]) if len(parts) > 2 else 1
        rows[(kind, size, streams)] = b["bytes_per_second"] / 1e9
    print(f"{'case':<14}{'bytes':>10}{'streams':>9}{'GB/s':>9}{'vs raw TCP':>12}")
    for (kind, size, streams), gbps in sorted(rows.items(), key=lambda r: (r[0][1], r[0][0], r[0][2])):
        raw = rows.get(("RawTcp", size, 1))
        ratio = f"{gbps / raw:.2f}" if raw else "-"
        print(f"{kind:<14}{size:>10}{streams:>9}{gbps:>9.2f}{ratio:>12}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
