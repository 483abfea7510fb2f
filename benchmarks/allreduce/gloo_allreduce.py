#!/usr/bin/env python3
"""gloo_allreduce.py: the baseline of `meshtrain-bench allreduce --baseline gloo`.

Times torch.distributed's gloo all_reduce (float32, SUM) between N local processes, with the
same rule as meshtrain-bench: before each iteration a barrier, a fill of the tensor and another
barrier, then each rank times its own all_reduce; an iteration's time is the slowest rank's;
the result is the median over repeats.

    /usr/bin/python3 gloo_allreduce.py --peers 4 --bytes 67108864 [--warmup 2] [--repeats 10]

Prints one JSON line on stdout: impl, peers, bytes, dtype, seconds, algbw_GBps, busbw_GBps,
iteration_seconds, verified, torch. Run it with OMP_NUM_THREADS=1 (meshtrain-bench does) and
GLOO_SOCKET_IFNAME=lo. Ranks are forked before torch is imported and die with their parent.
"""
import argparse
import ctypes
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import time
from datetime import timedelta


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def rank_main(rank, world, port, nbytes, warmup, repeats, timeout_s, results):
    die_with_parent()
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        tensor = torch.empty(nbytes // 4, dtype=torch.float32)
        expected = float(world * (world + 1) // 2)
        times, verified = [], True
        for i in range(warmup + repeats):
            dist.barrier()  # barrier, fill, barrier: as meshtrain-bench's workers
            tensor.fill_(float(rank + 1))
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            n = tensor.numel()
            for j in (0, n // 2, n - 1):
                if tensor[j].item() != expected:
                    verified = False
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, times, verified, torch.__version__, None))
    except Exception as e:  # reported by the parent, which exits non-zero
        results.put((rank, None, False, None, f"{type(e).__name__}: {e}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, required=True)
    ap.add_argument("--bytes", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--timeout-s", type=int, default=600)
    a = ap.parse_args()
    if a.peers < 2 or a.bytes <= 0 or a.bytes % 4 or a.repeats < 1 or a.warmup < 0:
        ap.error("need --peers >= 2, --bytes a positive multiple of 4, --repeats >= 1, --warmup >= 0")

    ctx = mp.get_context("fork")  # torch is not imported here yet, so forking is safe
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, daemon=True,
                         args=(r, a.peers, port, a.bytes, a.warmup, a.repeats, a.timeout_s, results))
             for r in range(a.peers)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + a.timeout_s
    try:
        while len(got) < a.peers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gloo ranks did not finish within {a.timeout_s} s")
            try:
                rank, times, ok, version, err = results.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty: check that nobody died
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                if dead:
                    raise RuntimeError(f"gloo rank(s) {dead} died (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})")
                continue
            if err:
                raise RuntimeError(f"gloo rank {rank}: {err}")
            got[rank] = (times, ok, version)
    except Exception as e:
        print(f"gloo_allreduce.py: {e}", file=sys.stderr)
        for p in procs:
            p.kill()
        return 1
    for p in procs:
        p.join(timeout=30)

    per_iter = [max(got[r][0][i] for r in range(a.peers)) for i in range(a.warmup, a.warmup + a.repeats)]
    seconds = statistics.median(per_iter)
    algbw = a.bytes / seconds / 1e9
    print(json.dumps({
        "impl": "gloo", "peers": a.peers, "bytes": a.bytes, "dtype": "float32",
        "repeats": a.repeats, "warmup": a.warmup, "seconds": seconds,
        "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (a.peers - 1) / a.peers,
        "iteration_seconds": per_iter, "verified": all(got[r][1] for r in range(a.peers)),
        "torch": got[0][2], "host": socket.gethostname(), "cores": os.cpu_count(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
