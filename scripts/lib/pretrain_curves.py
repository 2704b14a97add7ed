"""Curves of issue 14's pretraining runs from eabfit's scalars (TB_DIR/NAME/scalars.jsonl).

    python scripts/lib/pretrain_curves.py TB_DIR OUT.png NAME [NAME ...]

Writes every scalar of the named runs to curves.csv beside OUT.png and, where matplotlib
imports, plots the ones the issue asks for against the tokens seen: validation perplexity,
max top-1/median |h|, top-1/top-2 |h| at the layer of that max (a single outlier stands far
above the next entry; a stream that grows everywhere does not), the largest |h| after position 0
over the median (max over layers), massive count, attention on position 0 and on the slot
(means over layers), and the training loss.
"""
import csv
import json
import os
import sys


def main():
    tb, png, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    rows = []
    for n in names:
        p = os.path.join(tb, n, "scalars.jsonl")
        if os.path.exists(p):
            rows += [(n, d["tag"], d["step"], d["value"]) for d in map(json.loads, open(p))]
    csv_path = os.path.join(os.path.dirname(os.path.abspath(png)), "curves.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("run", "tag", "step", "value")] + rows)
    print(f"{csv_path}: {len(rows)} points")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: curves.csv only")
        return
    # tokens per step of each run, from its train/tokens scalar
    per_step = {}
    for n, t, s, v in rows:
        if t == "train/tokens" and s > 0:
            per_step[n] = v / s
    panels = [
        ("eval/ppl", "validation perplexity", True),
        ("eval/max_top1_over_median", "max top-1 / median |h|", False),
        ("eval/massive_count", "massive count", False),
        ("layers/first_token_attn/", "attention on position 0 (mean over layers)", False),
        ("layers/eab_slot_attn/", "attention on the slot (mean over layers)", False),
        ("train/loss", "training loss", False),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    separation(rows, names, per_step, axes.flat[6])
    after_first(rows, names, per_step, axes.flat[7])
    for ax, (tag, title, log) in zip(axes.flat, panels):
        for i, n in enumerate(names):
            pts = {}
            for run, t, s, v in rows:
                if run == n and v is not None and (t == tag or (tag.endswith("/") and t.startswith(tag))):
                    pts.setdefault(s, []).append(v)
            if pts:
                xs = sorted(pts)
                scale = per_step.get(n, 1.0) / 1e6
                ax.plot([x * scale for x in xs], [sum(pts[x]) / len(pts[x]) for x in xs], label=n, color=f"C{i}")
        ax.set_title(title)
        ax.set_xlabel("tokens (M)")
        if log:
            ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"{png} written")


def per_layer(rows, run, prefix):
    """{step: {layer: value}} of one run's layers/PREFIX/NN scalars."""
    out = {}
    for r, t, s, v in rows:
        if r == run and v is not None and t.startswith(prefix):
            out.setdefault(s, {})[t.rsplit("/", 1)[1]] = v
    return out


def draw(ax, n, i, per_step, pts, title):
    if pts:
        scale = per_step.get(n, 1.0) / 1e6
        ax.plot([x * scale for x, _ in pts], [y for _, y in pts], label=n, color=f"C{i}")
    ax.set_title(title)
    ax.set_xlabel("tokens (M)")
    ax.legend()


def separation(rows, names, per_step, ax):
    """Top-1/top-2 |h| at each evaluation's layer of largest top-1/median."""
    for i, n in enumerate(names):
        ratio = per_layer(rows, n, "layers/top1_over_median/")
        sep = per_layer(rows, n, "layers/top1_over_top2/")
        pts = []
        for s in sorted(ratio):
            layer = max(ratio[s], key=ratio[s].get)
            if sep.get(s, {}).get(layer) is not None:
                pts.append((s, sep[s][layer]))
        draw(ax, n, i, per_step, pts, "top-1 / top-2 |h| at the layer of max top-1/median")


def after_first(rows, names, per_step, ax):
    """Max over layers of the largest |h| after position 0 over the layer's median: the outlier
    attention can see when position 0 is hidden, or a second sink under a first-token one."""
    for i, n in enumerate(names):
        ratio = per_layer(rows, n, "layers/top1_over_median/")
        top1 = per_layer(rows, n, "layers/top1/")
        rest = per_layer(rows, n, "layers/top1_after_first/")
        pts = []
        for s in sorted(rest):
            # median = top-1 / (top-1/median), both logged per layer
            vals = [
                rest[s][l] * ratio[s][l] / top1[s][l]
                for l in rest[s]
                if top1.get(s, {}).get(l) and l in ratio.get(s, {})
            ]
            if vals:
                pts.append((s, max(vals)))
        draw(ax, n, i, per_step, pts, "max top-1 after position 0 / median |h|")


if __name__ == "__main__":
    main()
