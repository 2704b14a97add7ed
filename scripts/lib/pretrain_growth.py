"""How fast each pretraining run's outlier grows, from the curves.csv pretrain_curves.py writes.

    python scripts/lib/pretrain_growth.py CURVES.csv [STEP_FROM STEP_TO ...]

For each run and each step range (default: the whole run), the least-squares slope of the
evaluations' max top-1/median |h| per million tokens, how far the evaluations stray from that
line, and where a straight line through them
would reach the paper's 1000x: a projection, not a measurement, since the growth slows. Then the
validation perplexity and the ratio at every evaluation both runs share.
"""
import csv
import sys
from collections import defaultdict

RULE = 1000.0


def least_squares(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def main():
    path, bounds = sys.argv[1], [int(a) for a in sys.argv[2:]]
    if len(bounds) % 2:
        sys.exit("step ranges come in pairs: STEP_FROM STEP_TO")
    series = defaultdict(dict)
    for r in csv.DictReader(open(path)):
        series[(r["run"], r["tag"])][int(r["step"])] = float(r["value"])
    runs = sorted({run for run, tag in series if tag == "eval/max_top1_over_median"})
    ranges = list(zip(bounds[::2], bounds[1::2])) or [(0, 10**12)]
    for run in runs:
        ratio = series[(run, "eval/max_top1_over_median")]
        tokens = series[(run, "train/tokens")]
        per_step = max(tokens.values()) / max(tokens) if tokens else float("nan")
        for lo, hi in ranges:
            steps = sorted(s for s in ratio if lo <= s <= hi)
            if len(steps) < 2:
                print(f"{run} steps {lo}-{hi}: fewer than two evaluations")
                continue
            xs = [s * per_step / 1e6 for s in steps]
            ys = [ratio[s] for s in steps]
            slope, at0 = least_squares(xs, ys)
            reach = (RULE - at0) / slope if slope > 0 else float("inf")
            off = max(abs(y / (slope * x + at0) - 1) for x, y in zip(xs, ys))
            print(
                f"{run} steps {steps[0]}-{steps[-1]} ({xs[0]:.1f}M-{xs[-1]:.1f}M tokens, "
                f"{len(steps)} evaluations): {slope:.2f} per million tokens, evaluations "
                f"within {100 * off:.0f}% of the line; "
                f"a straight line reaches {RULE:.0f}x at {reach:.0f}M tokens"
            )
    shared = sorted(set.intersection(*(set(series[(r, "eval/ppl")]) for r in runs)))
    print("step\t" + "\t".join(f"{r} ppl\t{r} ratio" for r in runs))
    for s in shared:
        cells = [f"{series[(r, 'eval/ppl')][s]:.3f}\t{series[(r, 'eval/max_top1_over_median')][s]:.1f}" for r in runs]
        print(f"{s}\t" + "\t".join(cells))


if __name__ == "__main__":
    main()
