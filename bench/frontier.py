"""The most fidelity per stored bit: every method of one model on one PSNR-against-bits frontier (issue #52).

It reads one bench/reproduce.py --out that holds every arm (start it from the committed sweeps with
reproduce.py --start-from, then add the branch cells). Each method is a line through its widths or
budgets. A point's x is the bits per weight its runs store (models/core/bits.py; the mean over seeds),
its y their PSNR against the FP model's images, mean [95 % interval over training seeds and images].
Every distilled arm is taken at the multiplier its own search chose. A budgeted-branch line starts at
its cell's point without a branch (the same width, rank 0 everywhere).

Runs made before that count (bits_count 1, marked ¹ in reproduce.py's tables) are recounted: --recount
runs quantize.py again for each such run's quantizer variant, width and calibration seed (the same flags
and seed, so the same model) and keeps the count in <folder>/recount.json, resumably; for a PTQ run it
prints the recounted eps MSE beside the recorded one, a check that it is the same model.

    python bench/frontier.py --results runs/frontier_digits/results.json --recount \\
        --plot bench/results/frontier/digits.png
    python bench/frontier.py --results bench/results/w2a4_sweep.json,bench/results/w3a4_sweep.json,...

The goal rows (issue #52, item 4) pair the branch points with the baselines of the same seeds, image by
image: the best branch point that stores no more than the W3A4 baseline against it, and the best that
stores at most 0.25 bits per weight more than the W2A4 baseline against that.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import runs as R  # noqa: E402
from models.paired import format_interval, interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recount_key(folder, r):
    return f"w{r['wbits']}a{folder.abits}_{folder.cells[r['cell']][0]}_s{r['train_seed']}"


def recount(folder, results, model, store):
    """Runs quantize.py for every run counted before models/core/bits.py whose key store lacks; saves
    store (a dict) to <folder>/recount.json after each."""
    path = folder.out / "recount.json"
    old = [r for r in results["runs"].values() if r.get("wbits") and r.get("bits_count", 1) < 2]
    todo = {recount_key(folder, r): r for r in old}  # runs that share a quantized model share its count
    for k, r in sorted(todo.items()):
        if k in store:
            continue
        out = folder.out / "recount" / f"{k}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "quantize.py"), "--ckpt", R.MODEL_CHECKPOINTS[model], "--wbits", str(r["wbits"]),
               "--abits", str(folder.abits), *folder.quant[folder.cells[r["cell"]][0]], "--seed", str(r["train_seed"]),
               "--out", str(out), "--force"]
        print(f"recount {k}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"quantize.py failed for {k}:\n{proc.stderr[-2000:]}")
        q = json.loads(out.with_suffix(".json").read_text())
        store[k] = dict(bits_per_weight=q["bits_per_weight"], bits_count=q["bits_count"], eps_mse=q["eps_mse"],
                        command=" ".join(cmd[1:]).replace(str(ROOT) + "/", ""), seconds=round(q["seconds"], 1))
        for f in (out, out.with_suffix(".json")):
            f.unlink()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(store, indent=1, sort_keys=True))
        tmp.replace(path)
    for r in old:
        if folder.cells[r["cell"]][1] is None and r.get("eps_mse") is not None:  # PTQ: the recorded eps MSE is quantize.py's
            k = recount_key(folder, r)
            print(f"recount {k}: eps MSE {store[k]['eps_mse']:.5f} now, {r['eps_mse']:.5f} recorded")


def bits_of(folder, r, store):
    """A run's stored bits per weight under models/core/bits.py's count; None where it needs a recount."""
    if r.get("bits_count", 1) >= 2:
        return r["bits_per_weight"]
    return store.get(recount_key(folder, r), {}).get("bits_per_weight")


def branch(cell):
    """A cell's branch in words: '-', 'rank R' or 'budget B' (its start where the name gives it)."""
    bare, init = (cell.rsplit("_", 1) if cell.endswith(("_svd", "_loftq")) else (cell, ""))
    if "_bpw" in bare:
        return f"budget {bare.partition('_bpw')[2]}" + (f", {init}" if init else "")
    if "_lr" in bare:
        return f"rank {bare.partition('_lr')[2]}" + (f", {init}" if init else "")
    return "-"


def lines(folder, results):
    """{label: [(cell, n)]}: each method's points. A cell is a line through its widths, but a budgeted
    branch, whose line runs through its budgets at one width and starts at its cell without a branch."""
    cells = {(r["cell"], r["wbits"]) for r in results["runs"].values() if r.get("wbits")}
    out = {}
    for c, n in sorted(cells, key=lambda cn: (folder.order(cn[0]), cn[1])):
        if "_bpw" in c:
            base = c.partition("_bpw")[0]
            init = c.rpartition("_")[2] if c.endswith(("_svd", "_loftq")) else folder.lowrank_init
            label = f"{folder.names[base].split(' (')[0]} + branches by budget on W{n} codes ({init})"
            out.setdefault(label, [(base, n)] if (base, n) in cells else []).append((c, n))
        else:
            out.setdefault(folder.names[c].split(" (")[0], []).append((c, n))
    return out


def point(folder, results, store, cell, n, iters):
    """(runs, mean bits, {training seed: per-image PSNR}) of one cell at width n, at its search's choice."""
    rs = R.chosen_runs(results, cell, n, iters)
    psnr = {r["train_seed"]: folder.per_image(r, "psnr") for r in rs}
    if not rs or any(v is None for v in psnr.values()):
        return None
    bits = [bits_of(folder, r, store) for r in rs]
    if any(b is None for b in bits):
        raise SystemExit(f"W{n} {cell}: runs counted before models/core/bits.py; run with --recount")
    return rs, sum(bits) / len(bits), psnr


def paired(a, b):
    """The paired PSNR difference a - b over the seeds both have, image by image."""
    seeds = sorted(set(a[2]) & set(b[2]))
    return interval([a[2][s] - b[2][s] for s in seeds]) if seeds else None


def plot(points, path, size=(900, 520), margin=64, right=330):
    """PSNR vs FP against stored bits per weight, one line per method, a bar per point for its 95 %
    interval; PIL only."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [p["bits"] for pts in points.values() for p in pts]
    ys = [v for pts in points.values() for p in pts for v in (p["psnr"]["lo"], p["psnr"]["hi"])]
    x0, x1 = int(min(xs) * 4) / 4, int(max(xs) * 4 + 1) / 4
    y0, y1 = int(min(ys)) - 1, int(max(ys)) + 1
    px = lambda v: margin + (v - x0) / (x1 - x0) * (size[0] - margin - right)  # noqa: E731
    py = lambda v: size[1] - margin - (v - y0) / (y1 - y0) * (size[1] - 2 * margin)  # noqa: E731
    d.line([(margin, margin), (margin, size[1] - margin), (size[0] - right, size[1] - margin)], fill="black")
    for i in range(int((x1 - x0) * 4) + 1):
        v = x0 + i / 4
        d.line([(px(v), size[1] - margin), (px(v), size[1] - margin + 4)], fill="black")
        if i % 2 == 0:
            d.text((px(v) - 10, size[1] - margin + 6), f"{v:g}", fill="black")
    step = max(1, (y1 - y0) // 10)
    for v in range(y0, y1 + 1, step):
        d.text((8, py(v) - 6), str(v), fill="black")
        d.line([(margin - 4, py(v)), (margin, py(v))], fill="black")
    d.text((size[0] // 2 - 160, size[1] - 24), "stored bits per weight (models/core/bits.py)", fill="black")
    d.text((margin, 12), "PSNR vs the FP model's images, dB (higher is closer); bars: 95 % interval over seeds and images",
           fill="black")
    colours = [(200, 40, 40), (30, 90, 200), (230, 140, 30), (120, 60, 180), (30, 150, 60), (0, 150, 160),
               (160, 110, 40), (220, 60, 160), (90, 90, 90), (110, 170, 30)]
    labels = []
    for (label, pts), colour in zip(points.items(), colours * 2):
        pts = sorted(pts, key=lambda p: p["bits"])
        if len(pts) > 1:
            d.line([(px(p["bits"]), py(p["psnr"]["mean"])) for p in pts], fill=colour, width=2)
        for p in pts:
            x, m = px(p["bits"]), p["psnr"]
            d.line([(x, py(m["lo"])), (x, py(m["hi"]))], fill=colour, width=1)
            d.ellipse([x - 3, py(m["mean"]) - 3, x + 3, py(m["mean"]) + 3], fill=colour)
        labels.append([py(pts[-1]["psnr"]["mean"]) - 6, label, colour])
    prev = float("-inf")
    for y, label, colour in sorted(labels):  # in the right margin, from the top down, a line apart
        prev = max(y, prev + 12)
        d.text((size[0] - right + 12, prev), label, fill=colour)
    img.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True,
                        help="a bench/reproduce.py --out's results.json, or comma-separated results files of one folder "
                             "(the committed w<n>a<m>_sweep.json)")
    parser.add_argument("--iters", type=int, default=40, help="distill.py --iters of the points (x 20 updates)")
    parser.add_argument("--recount", action="store_true",
                        help="run quantize.py for the runs counted before models/core/bits.py (kept in recount.json)")
    parser.add_argument("--plot", type=Path, default=None, help="write the frontier as a PNG here")
    parser.add_argument("--plot-without", default="",
                        help="comma-separated cells left out of the plot (not the table), e.g. ptq,ptq_lr2: far below "
                             "the rest, they squeeze its scale")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.results.split(",")]
    if len({p.parent for p in paths}) != 1:
        parser.error("the results files must share one folder (their per-image files and recount.json are read from it)")
    try:
        results = R.merge_results(paths)
    except ValueError as e:
        parser.error(str(e))
    results.setdefault("select_by", "both")
    abits = {r["abits"] for r in results["runs"].values() if r.get("abits")}
    if len(abits) > 1:
        parser.error(f"the results hold runs at activation widths {sorted(abits)}; give one width's files")
    folder = R.RunFolder(paths[0].parent, abits.pop() if abits else 4, results.get("lowrank_init", "loftq"))
    for r in list(results["runs"].values()) + list(results["search"].values()):
        folder.register(r["cell"])
    model = results["model"]
    store_path = folder.out / "recount.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    if args.recount:
        recount(folder, results, model, store)

    points, by_cell = {}, {}
    for label, members in lines(folder, results).items():
        for c, n in members:
            if (c, n) not in by_cell:
                by_cell[c, n] = point(folder, results, store, c, n, args.iters)
            if by_cell[c, n]:
                rs, bits, psnr = by_cell[c, n]
                points.setdefault(label, []).append(dict(cell=c, n=n, bits=bits, psnr=interval(list(psnr.values())),
                                                         seeds=sorted(psnr), mult=rs[0]["lr_mult"]))
    if not points:
        raise SystemExit(f"{args.results}: no scored run with per-image figures")
    every = [p for pts in points.values() for p in pts]
    best = {id(p) for p in every if not any(q["bits"] <= p["bits"] and q["psnr"]["mean"] > p["psnr"]["mean"] for q in every)}
    print(f"Frontier of the {model} model: PSNR vs the FP model's images, mean [95 % interval over training seeds and "
          f"images], each arm at its search's multiplier ({results['select_by']} eps MSE); ★ no point stores fewer or "
          f"as many bits and is closer.\n")
    print("| method | codes | branch | bits / weight | LoRA lr × | seeds | PSNR vs FP, dB |")
    print("|---|---|---|---|---|---|---|")
    for label, pts in points.items():
        for p in sorted(pts, key=lambda p: p["bits"]):
            print(f"| {label} | W{p['n']}A{folder.abits} | {branch(p['cell'])} | {p['bits']:.2f} | {R.fmt(p['mult'], 'g')} | "
                  f"{','.join(map(str, p['seeds']))} | {format_interval(p['psnr'], '.2f')}{' ★' if id(p) in best else ''} |")

    # the goal (issue #52, item 4): branch points against the baselines, paired per seed and image
    print("\nBranch points against the baselines (paired per training seed and image, dB):\n")
    print("| branch point | bits / weight | against | its bits / weight | PSNR difference, dB |")
    print("|---|---|---|---|---|")
    branches = [(c, n) for (c, n), v in by_cell.items() if v and ("_bpw" in c or "_lr" in c)]
    for ref_n, slack, what in ((3, 0.0, "no more bits than"), (2, 0.25, "at most 0.25 more bits than")):
        ref = by_cell.get(("baseline", ref_n))
        if not ref:
            continue
        within = [(c, n) for c, n in branches if by_cell[c, n][1] <= ref[1] + slack + 1e-9]
        for c, n in sorted(within, key=lambda cn: by_cell[cn][1]):
            diff = paired(by_cell[c, n], ref)
            print(f"| W{n}A{folder.abits} {folder.names[c]} | {by_cell[c, n][1]:.2f} | W{ref_n}A{folder.abits} baseline "
                  f"({what}) | {ref[1]:.2f} | {format_interval(diff, '+.2f') if diff else '-'} |")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        without = set(args.plot_without.split(","))
        plot({label: kept for label, pts in points.items() if (kept := [p for p in pts if p["cell"] not in without])},
             args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
