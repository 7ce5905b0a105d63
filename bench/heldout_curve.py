"""Training and held-out eps MSE over the updates of distillation runs made with
`distill.py --eval-every N`: a Markdown table and a PNG (PIL only, log-scale error).

    python bench/heldout_curve.py runs/heldout/baseline_x16_it160.json runs/heldout/mpqdm_x64_it160.json \
        --labels "baseline x16" "MPQ-DM x64" --out bench/results/history/heldout_w2a4_s0.png
    python bench/heldout_curve.py ... --metrics both guided   # also the held-out MSE of the guided eps

Held-out metrics (what distill.py --eval-every logs): 'both' is the eps MSE over both guidance
halves' UNet outputs (the eps-MSE figure everywhere else), 'guided' the MSE of the guided eps (what
the training loss is, by default), 'cond' / 'uncond' each half's.
"""
import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="distill.py report JSONs (<out>.json)")
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--metrics", nargs="+", choices=["both", "guided", "cond", "uncond"], default=["both"],
                        help="held-out series per report (the first is drawn thick)")
    args = parser.parse_args(argv)
    labels = args.labels or [p.stem for p in args.reports]
    if len(labels) != len(args.reports):
        parser.error("give one label per report")

    curves = {}  # (label, metric): [(updates, training MSE, held-out value or None)]
    for label, path in zip(labels, args.reports):
        r = json.loads(path.read_text())
        per_iter = r["updates_run"] // len(r["history"]) if r["updates_run"] else 20
        for metric in args.metrics:
            key = "eps_mse_held_out" + ("" if metric == "both" else f"_{metric}")
            points = [(0, None, r["eps_mse_before"])] if metric == "both" else []
            points += [(h["iter"] * per_iter, h.get("mse_mean"), h.get(key)) for h in r["history"]]
            if metric == "both" and "eps_mse_held_out" not in r["history"][-1]:
                points.append((points[-1][0], None, r["eps_mse_after"]))
            if any(h is not None for _, _, h in points):
                curves[(label, metric)] = points

    print("| updates | " + " | ".join(f"{l}: training loss MSE (mean over the iteration)" + "".join(
        f" | {l}: held-out {m} eps MSE" for m in args.metrics if (l, m) in curves) for l in labels) + " |")
    print("|---|" + "".join("---|" * (1 + sum((l, m) in curves for m in args.metrics)) for l in labels))
    rows = sorted({u for pts in curves.values() for u, _, h in pts if h is not None})
    for u in rows:
        cells = []
        for label in labels:
            series = [curves[(label, m)] for m in args.metrics if (label, m) in curves]
            hits = [next((p for p in pts if p[0] == u and p[2] is not None), None) for pts in series]
            train = next((p[1] for p in hits if p is not None and p[1]), None)
            cells += [f"{train:.4f}" if train else "-"] + [f"{p[2]:.4f}" if p else "-" for p in hits]
        print(f"| {u} | " + " | ".join(cells) + " |")

    # ---- the picture: held-out (solid) and training (thin) error against updates, error on a log scale
    W, H, M, R = 760, 440, 60, 190
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    values = [v for pts in curves.values() for _, t, h in pts for v in (t, h) if v]
    x1 = max(u for pts in curves.values() for u, _, _ in pts)
    y0, y1 = math.log10(min(values)) - 0.05, math.log10(max(values)) + 0.05
    px = lambda u: M + u / x1 * (W - M - R)
    py = lambda v: H - M - (math.log10(v) - y0) / (y1 - y0) * (H - 2 * M)
    d.line([(M, M), (M, H - M), (W - R, H - M)], fill="black")
    for k in range(5):
        u = round(x1 * k / 4)
        d.text((px(u) - 12, H - M + 6), str(u), fill="black")
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if y0 <= math.log10(v) <= y1:
                d.line([(M - 4, py(v)), (M, py(v))], fill="black")
                d.text((4, py(v) - 6), f"{v:g}", fill="black")
    d.text((W // 2 - 60, H - 24), "distillation updates", fill="black")
    d.text((M, 12), f"held-out eps MSE vs FP ({', '.join(args.metrics)}; the first thick); training MSE loss, "
           "mean per iteration (thin); log scale", fill="black")
    colours = dict(zip(labels, [(200, 40, 40), (30, 90, 200), (30, 150, 60), (120, 60, 180)]))
    for i, ((label, metric), pts) in enumerate(curves.items()):
        colour, first = colours[label], metric == args.metrics[0]
        held = [(px(u), py(h)) for u, _, h in pts if h]
        train = [(px(u), py(t)) for u, t, _ in pts if t]
        if len(train) > 1 and first:
            d.line(train, fill=tuple(c // 2 + 127 for c in colour), width=1)
        d.line(held, fill=colour if first else tuple(c // 3 * 2 for c in colour), width=3 if first else 2)
        d.text((W - R + 8, M + 16 * i), label + ("" if len(args.metrics) == 1 else f" ({metric})"), fill=colour)
    img.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
