#!/usr/bin/env python3
"""torch.topk on the GPU: the baseline for the top-k codec's CUDA path (issue 4: top-k of 1% of
64M elements at least 3x faster than torch.topk in the same run).

Prints JSON lines like meshtrain-bench-compress's: {"codec": "torch.topk", "op", "count", "k",
"bytes", "median_ms", "device", "repeats"}, timed as meshtrain-bench-compress times the codec
(host clock around the call and a stream synchronize; median of --repeats after two warm-ups),
on gradient-like data drawn on the GPU (normal, sigma 0.01, 1% outliers x20).
k is the codec's: ceil(fraction * count), a product within 1e-9 of an integer counting as it.

ops: topk_abs_unsorted  torch.topk(x.abs(), k, sorted=False) (what the issue compares with)
     topk_abs_sorted    the same with sorted=True
     topk_payload       the codec's whole job done with torch: top-k of |x|, indices sorted
                        ascending, values gathered, both copied to pinned host memory
     copy_d2d           x.clone(): a device-to-device copy of the same bytes, for reference
Without torch or a GPU it prints one {"device": "cuda", "skipped": reason} line and exits 0.
"""
import argparse
import json
import math
import time


def codec_k(fraction, count):
    p = fraction * count
    r = round(p)
    k = r if abs(p - r) < 1e-9 else math.ceil(p)
    return max(1, min(k, count)) if count > 0 else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=64 << 20)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        print(json.dumps({"device": "cuda", "skipped": f"torch.topk baseline: no torch ({e})"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"device": "cuda", "skipped": "torch.topk baseline: torch.cuda.is_available() is false"}))
        return 0

    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(1)
    x = torch.randn(a.count, device=dev, generator=gen) * 0.01
    x = torch.where(torch.rand(a.count, device=dev, generator=gen) < 0.01, x * 20, x)
    k = codec_k(a.fraction, a.count)
    host_idx = torch.empty(k, dtype=torch.int32, pin_memory=True)
    host_val = torch.empty(k, dtype=torch.float32, pin_memory=True)

    def payload():
        _, idx = torch.topk(x.abs(), k, sorted=False)
        idx, _ = torch.sort(idx)
        host_idx.copy_(idx.to(torch.int32), non_blocking=True)
        host_val.copy_(x[idx], non_blocking=True)

    ops = {
        "topk_abs_unsorted": lambda: torch.topk(x.abs(), k, sorted=False),
        "topk_abs_sorted": lambda: torch.topk(x.abs(), k, sorted=True),
        "topk_payload": payload,
        "copy_d2d": lambda: x.clone(),
    }
    device = f"cuda:0 ({torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda})"
    for op, run in ops.items():
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(json.dumps({"codec": "torch.topk", "op": op, "count": a.count, "k": k, "bytes": a.count * 4,
                          "median_ms": round(times[len(times) // 2], 4), "device": device,
                          "repeats": a.repeats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
