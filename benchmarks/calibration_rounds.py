"""How much calibration's timings move from one pass over its suite to the next, on this host.

Calibration times each micro-benchmark once per round over the suite and keeps
its lowest median (``calibrate.run_suite``); a benchmark whose two fastest
rounds differ by more than ``calibrate.ROUND_AGREEMENT`` is timed again. This
lowers the suite once, times it ``--passes`` times in calibration's order (as
its later rounds do: one warm-up run, median of ``--repeat``), and after each
pass times the calibration's layer stacks that ``compare`` reads the host's
speed with (``reference_speed.REFERENCE_BENCHMARKS``) alone, as ``compare``
does. It prints, over all passes:

- each benchmark's slowest over its fastest pass (the worst ones, and the median);
- how many benchmarks' first two passes disagree by more than ROUND_AGREEMENT;
- for how many the lower of the first two passes is more than 5 % above the
  lowest of all passes: what a two-round calibration keeps too slow; and the
  same with a third pass where the first two disagree (calibration's rule, one
  extra round);
- the reference stacks' lowest time in the suite over their lowest alone.

    .venv/bin/python benchmarks/calibration_rounds.py --backend ort --passes 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tfcompile.calibrate import ROUND_AGREEMENT, lower_benchmarks, rounds_agree, time_benchmark_s
from tfcompile.cost_models.device import detect_host
from tfcompile.reference_speed import REFERENCE_BENCHMARKS

KEPT_TOO_SLOW = 0.05


def _share_above(kept_s: list[float], lowest_s: list[float]) -> float:
    return sum(kept > low * (1 + KEPT_TOO_SLOW) for kept, low in zip(kept_s, lowest_s)) / len(kept_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("ort", "tvm"), default="ort")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--show", type=int, default=12, help="benchmarks with the widest spread to list")
    args = parser.parse_args()
    if args.passes < 3:
        parser.error("--passes must be at least 3 (two rounds and a third to judge them by)")
    host = detect_host()
    print(f"host: {host.model}, {host.cores} cores; {args.backend}, {args.passes} passes, repeat {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="tfcompile-rounds-") as workdir:
        runs = lower_benchmarks(args.backend, Path(workdir))
        in_suite_s: dict[str, list[float]] = {name: [] for name in runs}
        alone_s: dict[str, list[float]] = {name: [] for name in REFERENCE_BENCHMARKS if name in runs}
        for index in range(args.passes):
            for name, run in runs.items():
                in_suite_s[name].append(time_benchmark_s(run, args.backend, repeat=args.repeat, warmup=1))
            for name in alone_s:
                alone_s[name].append(time_benchmark_s(runs[name], args.backend, repeat=args.repeat))
            print(f"pass {index + 1}/{args.passes} done", flush=True)
    spreads = sorted(((max(times) / min(times), name) for name, times in in_suite_s.items()), reverse=True)
    print(f"slowest over fastest pass, the {args.show} widest (ms per pass):")
    for spread, name in spreads[:args.show]:
        print(f"  {name:40s} {spread:5.2f}x  " + " ".join(f"{s * 1e3:.3f}" for s in in_suite_s[name]))
    print(f"median over {len(spreads)} benchmarks: {statistics.median(s for s, _ in spreads):.2f}x")
    first_two = [times[:2] for times in in_suite_s.values()]
    lowest = [min(times) for times in in_suite_s.values()]
    disagree = sum(not rounds_agree(pair) for pair in first_two)
    print(f"first two passes differ by more than {ROUND_AGREEMENT:.0%}: {disagree} of {len(first_two)}")
    two_rounds = [min(pair) for pair in first_two]
    with_third = [min(times[:2] if rounds_agree(times[:2]) else times[:3]) for times in in_suite_s.values()]
    print(f"kept more than {KEPT_TOO_SLOW:.0%} above the lowest of all passes: two rounds "
          f"{_share_above(two_rounds, lowest):.0%}; "
          f"with a third where they disagree {_share_above(with_third, lowest):.0%}")
    for name, times in alone_s.items():
        print(f"{name}: lowest in the suite over lowest alone {min(in_suite_s[name]) / min(times):.3f} "
              f"(in the suite {' '.join(f'{s * 1e3:.2f}' for s in in_suite_s[name])} ms; "
              f"alone {' '.join(f'{s * 1e3:.2f}' for s in times)} ms)")


if __name__ == "__main__":
    main()
