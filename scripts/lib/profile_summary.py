"""Per-kernel GPU time from `ncu --csv --metrics gpu__time_duration.sum` (scripts/lib/profile.sh
writes it), summed by kernel name, largest first.

    python3 scripts/lib/profile_summary.py PROFILE.txt[.xz] [--top 30] [--step N]

--step N keeps one pretraining step of the `pretrain` shape: the launches from the (N+1)-th
embedding lookup (`is_u32_*`: the first is the evaluation before step 1) up to the next one,
the following step's or the final evaluation's. Prints the launch count and kernel time, then
one row per kernel name: ms, share, launches.
"""
import argparse
import csv
import lzma


def launches(path):
    opener = lzma.open if path.endswith(".xz") else open
    rows = list(csv.reader(opener(path, "rt", errors="replace")))
    hi = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    head = rows[hi]
    ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
    out = []
    for r in rows[hi + 1:]:
        if len(r) != len(head):
            continue
        try:
            v = float(r[vi].replace(",", ""))
        except ValueError:
            continue
        ms = v * {"ns": 1e-6, "us": 1e-3, "ms": 1.0}.get(r[ui], 1e-6)
        out.append((r[ki].split("(")[0][:80].strip(), ms))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--step", type=int)
    a = ap.parse_args()
    seq = launches(a.profile)
    if a.step is not None:
        lookups = [i for i, (n, _) in enumerate(seq) if n.startswith("is_u32_")]
        if len(lookups) < a.step + 1:
            raise SystemExit(f"{a.profile}: {len(lookups)} embedding lookups, no step {a.step}")
        end = lookups[a.step + 1] if len(lookups) > a.step + 1 else len(seq)
        seq = seq[lookups[a.step]:end]
    tot = {}
    for name, ms in seq:
        t = tot.setdefault(name, [0.0, 0])
        t[0] += ms
        t[1] += 1
    ms_all = sum(ms for _, ms in seq)
    print(f"{len(seq)} launches, {ms_all:.1f} ms of kernel time")
    for name, (ms, n) in sorted(tot.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"{ms:9.2f} ms {100 * ms / ms_all:5.1f}% {n:6d}x  {name}")


if __name__ == "__main__":
    main()
