#!/usr/bin/env python3
"""rounds-summary.py - per-cell verdicts from repeated compare.sh rounds (issue 16).

Usage: rounds-summary.py [--a pgwake] [--b haproxy] [--base direct] ROUND_DIR...

Each ROUND_DIR holds one compare.sh results.tsv. Within a round every cell ran its targets
back to back, so the ratio A/B of one round is a paired sample: machine noise that lasts
longer than a cell (a build, a noisy neighbour) hits both. Per cell this prints, over the
rounds:
  - the median of A/base and B/base (throughput relative to direct Postgres);
  - the median of the paired ratio A/B, the rounds in which A was ahead, and a
    distribution-free confidence interval for that median (order statistics of the
    binomial, no assumption about the shape of the noise);
  - a verdict: "ahead" when the whole interval is above 1, "behind" when it is below 1,
    otherwise "level": the rounds cannot tell the two apart.
bulk-copy repetitions are kept apart as well: each repetition of A against the same
repetition of the base, the figure the issue's "COPY >= 0.97 x direct" is about.
Higher is better for every unit compare.sh reports (tps, conn/s, MB/s).
"""
import argparse
import csv
import math
import os
import statistics
import sys
from collections import defaultdict

CELL_NAMES = {
    "select-only": "pgbench -S",
    "select1": "SELECT 1",
    "connect": "-C (new conn/txn)",
    "connect-serial": "serial connect",
    "bulk-copy": "COPY 1 GB",
}


def binom_cdf(k, n):
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2**n


def median_ci(xs, level=0.90):
    """The widest-coverage-first order-statistic interval [x_(k), x_(n-k+1)] whose coverage
    is at least `level`; returns (low, high, coverage), or None when n is too small."""
    xs = sorted(xs)
    n = len(xs)
    best = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * binom_cdf(k - 1, n)
        if coverage >= level:
            best = (xs[k - 1], xs[n - k], coverage)
    return best


def sign_test_p(wins, n):
    """Two-sided sign test: how likely `wins` of `n` (or more extreme) is when A and B are
    equal."""
    if n == 0:
        return 1.0
    k = min(wins, n - wins)
    return min(1.0, 2 * binom_cdf(k, n))


def load(dirs):
    """{(test, clients): {round: {target: [values...]}}}"""
    cells = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r, d in enumerate(dirs):
        path = os.path.join(d, "results.tsv")
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row["test"] == "first-connect" or row["value"] in ("", "NA"):
                    continue
                cells[(row["test"], int(row["clients"]))][r][row["target"]].append(
                    float(row["value"]))
    return cells


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="pgwake")
    ap.add_argument("--b", default="haproxy")
    ap.add_argument("--base", default="direct")
    ap.add_argument("--level", type=float, default=0.90)
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    a, b, base = args.a, args.b, args.base
    cells = load(args.dirs)
    order = ["select-only", "select1", "connect", "connect-serial", "bulk-copy"]
    keys = sorted(cells, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1]))

    print(f"{len(args.dirs)} rounds; paired ratio = {a}/{b} within a round; "
          f"interval: order statistics, coverage >= {args.level:.0%}\n")
    print(f"| cell | clients | {b}/{base} (median) | {a}/{base} (median) | "
          f"{a}/{b} median | {a} ahead | interval | sign test p | verdict |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    copy_reps = []
    tally = defaultdict(int)
    for key in keys:
        test, clients = key
        rounds = cells[key]
        ra, rb, paired = [], [], []
        for r in sorted(rounds):
            t = rounds[r]
            if not (t.get(a) and t.get(b) and t.get(base)):
                continue
            va, vb, vbase = (statistics.median(t[x]) for x in (a, b, base))
            ra.append(va / vbase)
            rb.append(vb / vbase)
            paired.append(va / vb)
            if test == "bulk-copy":
                copy_reps.extend(x / y for x, y in zip(t[a], t[base]))
        n = len(paired)
        if n == 0:
            continue
        wins = sum(1 for p in paired if p > 1)
        ci = median_ci(paired, args.level)
        if ci is None:
            interval, verdict = "(too few rounds)", "level"
        else:
            lo, hi, cov = ci
            interval = f"{lo:.3f}-{hi:.3f} ({cov:.0%})"
            verdict = "ahead" if lo > 1 else "behind" if hi < 1 else "level"
        tally[verdict] += 1
        print(f"| {CELL_NAMES.get(test, test)} | {clients} | {statistics.median(rb):.2f} | "
              f"{statistics.median(ra):.2f} | {statistics.median(paired):.3f} | {wins}/{n} | "
              f"{interval} | {sign_test_p(wins, n):.3f} | {verdict} |")
    print("\nverdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    if copy_reps:
        reps = " ".join(f"{x:.2f}" for x in copy_reps)
        below = sum(1 for x in copy_reps if x < 0.97)
        print(f"\nCOPY, every repetition of {a} / the same repetition of {base}: {reps}")
        print(f"({below} of {len(copy_reps)} below 0.97; median {statistics.median(copy_reps):.2f})")


if __name__ == "__main__":
    sys.exit(main())
