#!/usr/bin/env python3
"""Summarises the GPU compression benchmarks against issue 4's targets.

Usage: gpu_summary.py BENCH.jsonl TORCH_TOPK.jsonl
  BENCH.jsonl       meshtrain-bench-compress --device cuda records (kernels alone: op *_kernel,
                    and whole codec calls: encode / decode / decode_accumulate, the same
                    with "_pinned": the payload in pinned host memory)
  TORCH_TOPK.jsonl  benchmarks/compress/torch_topk.py records

Targets: fp16/bf16/int8 encode and decode kernels at least 0.80 of a device-to-device copy of
the same fp32 bytes measured in the same run (ratio_vs_memcpy; int8's encode without error
feedback, since with it the kernel moves 13 bytes per element against the copy's 8); the top-k
selection of 1% (error feedback off; select_kernel: indices and values left on the device, as
torch.topk leaves them; the whole encode, which also copies the payload to host memory, is
printed beside it) at least 3x faster than torch.topk of |x| in the same machine session.
Prints a table; a missing or skipped input is reported, never an error.
"""
import json
import sys


def read(path):
    records = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError as e:
        print(f"{path}: {e}")
    return records


def main(argv):
    bench = read(argv[1]) if len(argv) > 1 else []
    torch_records = read(argv[2]) if len(argv) > 2 else []
    for r in bench + torch_records:
        if "skipped" in r:
            print(f"skipped: {r['skipped']}")
        if "error" in r:
            print(f"FAILED: {r.get('codec')} {r.get('op')}: {r['error']}")
    # Codec records only (gpu-check.sh later appends the all-reduce's records to the same file).
    cuda = [r for r in bench if "ratio_vs_memcpy" in r and str(r.get("device", "")).startswith("cuda")]
    if cuda:
        print(f"device: {cuda[0]['device']}; fp32 bytes per call: {cuda[0]['bytes']}")
        print(f"{'codec':36} {'op':26} {'ms':>8} {'GB/s':>8} {'copy':>8} {'ratio':>6}  target")
        for r in cuda:
            kernel = r["op"].endswith("_kernel")
            target = ""
            # int8's encode with error feedback moves 13 bytes per element (x, residual in and
            # out, q) against the copy's 8: its ratio cannot pass 8/13; the target is read on the
            # kernel without it, which moves 5 (fp16's moves 6).
            if kernel and "accumulate" not in r["op"] and (
                    r["codec"] in ("fp16", "bf16", "int8:error_feedback=off")
                    or (r["codec"] == "int8" and r["op"] == "decode_kernel")):
                target = ">= 0.80: " + ("met" if r["ratio_vs_memcpy"] >= 0.80 else "NOT met")
            elif kernel and r["codec"] == "int8" and r["op"] == "encode_kernel":
                target = f"error feedback: {r['ratio_vs_memcpy'] / (8 / 13):.2f} of its 8/13 ceiling"
            print(f"{r['codec']:36} {r['op']:26} {r['median_ms']:8.3f} {r['GBps']:8.1f} "
                  f"{r['memcpy_GBps']:8.1f} {r['ratio_vs_memcpy']:6.2f}  {target}")
    # Whole codec calls with the payload in pinned host memory (as the compressed all-reduce
    # keeps it for CUDA buffers) against pageable memory, same run.
    whole = {(r["codec"], r["op"]): r for r in cuda}
    pairs = [(codec, op) for (codec, op) in whole if op in ("encode", "decode", "decode_accumulate")
             and (codec, op + "_pinned") in whole]
    if pairs:
        print("payload in pinned vs pageable host memory (whole codec calls):")
        for codec, op in pairs:
            pageable, pinned = whole[(codec, op)], whole[(codec, op + "_pinned")]
            print(f"  {codec:36} {op:18} pageable {pageable['median_ms']:8.3f} ms  pinned "
                  f"{pinned['median_ms']:8.3f} ms  {pageable['median_ms'] / pinned['median_ms']:5.2f}x")
    ours = {r["codec"]: r for r in cuda if r["op"] == "encode" and r["codec"].startswith("topk")}
    theirs = {r["op"]: r for r in torch_records if r.get("codec") == "torch.topk"}
    selection = ours.get("topk:fraction=0.01,error_feedback=off")
    if selection and "topk_abs_unsorted" in theirs:
        print(f"top-k of 1%, {theirs['topk_abs_unsorted']['count']} elements, k = {theirs['topk_abs_unsorted']['k']}:")
        for name, r in ours.items():
            print(f"  meshtrain {name:40} encode {r['median_ms']:8.3f} ms")
        for op, r in theirs.items():
            print(f"  torch     {op:40}        {r['median_ms']:8.3f} ms")
        base = theirs["topk_abs_unsorted"]["median_ms"]
        phases = {r["op"]: r for r in cuda if r["codec"] == "topk:fraction=0.01,error_feedback=off"
                  and r["op"].startswith(("select_", "payload_"))}
        for op, r in phases.items():
            print(f"  meshtrain {op:40}        {r['median_ms']:8.3f} ms")
        print(f"  whole encode (payload in host memory) vs torch.topk(|x|, k, sorted=False): "
              f"{base / selection['median_ms']:.2f}x")
        # The target's comparison: the selection with its output on the device, as torch.topk's
        # (records from before the phases were timed: the whole encode).
        judged, name = ((phases["select_kernel"], "selection on the device (select_kernel)")
                        if "select_kernel" in phases else (selection, "whole encode"))
        speedup = base / judged["median_ms"]
        print(f"  {name} vs torch.topk: {speedup:.2f}x  target >= 3: " + ("met" if speedup >= 3 else "NOT met"))
        if "select_kernel_next" in phases:  # the candidate kernels, not yet the codec's
            print(f"  candidate selection (select_kernel_next: aggregated histograms, device scan): "
                  f"{base / phases['select_kernel_next']['median_ms']:.2f}x torch.topk")
        if "select_sampled" in phases:  # selection=sampled, not yet the codec's default
            bracket = next((r for r in bench if r.get("op") == "select_sampled_bracket" and "error" not in r), None)
            valid = bool(bracket and bracket.get("hit") and bracket.get("matches_radix"))
            if not bracket or not bracket.get("hit"):
                held = "bracket MISSED: timed up to the miss, not a selection"
            else:
                same = bracket.get("matches_radix")
                held = (f"bracket held, {bracket['candidates']} candidates for k = {bracket['k']}, output "
                        + ("equals the radix select's" if same else "DIFFERS from the radix select's"))
            sampled = base / phases["select_sampled"]["median_ms"]
            print(f"  sampled selection (select_sampled; {held}): {sampled:.2f}x torch.topk  target >= 3: "
                  + ("met" if sampled >= 3 and valid else "NOT met"))
        if "topk_payload" in theirs:
            print(f"  vs the same payload built with torch: {theirs['topk_payload']['median_ms'] / selection['median_ms']:.2f}x")
    else:
        print("top-k comparison: missing records (meshtrain topk:fraction=0.01,error_feedback=off encode, "
              "or torch.topk topk_abs_unsorted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
