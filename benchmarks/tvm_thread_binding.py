"""Whether pinning TVM's worker threads to cores makes its kernels' timings jump, on this host.

TVM pins each worker thread of its pool to one core and leaves the main thread
(which runs task 0) free to migrate (``TVM_BIND_THREADS``, default on). With as
many workers as cores, the main thread can sit on the core its worker is pinned
to; a parallel kernel then runs both halves on one core, at the single-thread
time. This starts ``--processes`` fresh processes per setting, alternating
bound and unbound, each lowering a few calibration micro-benchmarks and timing
them ``--rounds`` times as calibration does. It prints, per setting:

- the median of each benchmark's per-round medians;
- how many rounds ran at least 1.5x the benchmark's fastest round over both
  settings (the "doubled" rounds a pinned main thread would cause).

    .venv/bin/python benchmarks/tvm_thread_binding.py --processes 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = ("linear_m16_k768_n768", "linear_m16_k3072_n768", "linear_m128_k768_n768", "linear_m512_k768_n768",
              "sdpa_h12_s64_d64", "sdpa_causal_h4_s512_d64")
SLOW_ROUND = 1.5


def time_in_this_process(rounds: int) -> dict[str, list[float]]:
    from tfcompile.calibrate import lower_benchmarks, time_benchmark_s

    with tempfile.TemporaryDirectory(prefix="tfcompile-binding-") as workdir:
        runs = lower_benchmarks("tvm", Path(workdir), BENCHMARKS)
        medians_s = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                medians_s[name].append(time_benchmark_s(run, "tvm"))
    return medians_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_in_this_process(args.rounds)))
        return
    from tfcompile.cost_models.device import detect_host

    host = detect_host()
    threads = os.environ.get("TVM_NUM_THREADS", str(host.cores))
    print(f"host: {host.model}, {host.cores} cores; TVM {threads} threads, {args.processes} processes per setting, "
          f"{args.rounds} rounds each")
    rounds_s: dict[str, dict[str, list[float]]] = {"1": {}, "0": {}}
    for index in range(args.processes):
        for bind in ("1", "0"):
            env = dict(os.environ, TVM_BIND_THREADS=bind, TVM_NUM_THREADS=threads)
            result = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)], env=env,
                                    check=True, capture_output=True, text=True)
            for name, seconds in json.loads(result.stdout.strip().splitlines()[-1]).items():
                rounds_s[bind].setdefault(name, []).extend(seconds)
            print(f"process {index + 1}/{args.processes}, TVM_BIND_THREADS={bind} done", flush=True)
    print(f"{'benchmark':28s} {'bound ms':>9s} {'unbound ms':>11s}  rounds >= {SLOW_ROUND}x fastest: bound, unbound")
    slow_total = {"1": 0, "0": 0}
    for name in rounds_s["1"]:
        fastest = min(rounds_s["1"][name] + rounds_s["0"][name])
        slow = {bind: sum(s >= SLOW_ROUND * fastest for s in rounds_s[bind][name]) for bind in ("1", "0")}
        for bind in slow:
            slow_total[bind] += slow[bind]
        print(f"{name:28s} {1e3 * statistics.median(rounds_s['1'][name]):9.3f} "
              f"{1e3 * statistics.median(rounds_s['0'][name]):11.3f}  {slow['1']:3d} {slow['0']:3d}  "
              f"of {len(rounds_s['1'][name])}")
    print(f"slow rounds in all: bound {slow_total['1']}, unbound {slow_total['0']}")


if __name__ == "__main__":
    main()
