"""Each verdict of the yardstick on two models side by side: the paired PSNR difference (dB, 95 % interval
over training seeds and images) of one arm against another at the same width, on each model, and whether
the verdict holds (both resolved, same sign), flips (both resolved, opposite signs) or stays unresolved
(an interval holds 0). Every arm is taken at the multiplier its model's own search chose (bench/runs.py).

    python bench/verdicts.py --a digits=bench/results/w2a4_sweep.json,bench/results/w4a4_sweep.json \\
        --b photos=runs/photos_yard/results.json

A model's result files are bench/reproduce.py results (one --out's results.json, or the committed
w<n>a<m>_sweep.json files of one folder); their per-image files are read from beside them.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.runs import RunFolder, chosen_runs, merge_results  # noqa: E402
from models.paired import format_interval, interval, resolved  # noqa: E402

# (what the verdict says, width, arm, against): the digits model's verdicts (README, docs/results.md)
VERDICTS = [
    ("distillation rescues uniform PTQ", 2, "baseline", "ptq"),
    ("MPQ-DM against the baseline", 2, "mpqdm", "baseline"),
    ("TRD only against the baseline", 2, "trd", "baseline"),
    ("OMQ only against the baseline", 2, "omq", "baseline"),
    ("OMQ under TRD: MPQ-DM against TRD only", 2, "mpqdm", "trd"),
    ("TRD under OMQ's bits: MPQ-DM against OMQ only", 2, "mpqdm", "omq"),
    ("a tenth of the official relation weight against the official weight", 2, "tenth", "mpqdm"),
    ("a tenth of the official relation weight: MPQ-DM then against the baseline", 2, "tenth", "baseline"),
    ("the float rank-2 branch against the cold start", 2, "baseline_lr2", "baseline"),
    ("distillation rescues uniform PTQ", 3, "baseline", "ptq"),
    ("MPQ-DM against the baseline", 3, "mpqdm", "baseline"),
    ("OMQ only against the baseline", 3, "omq", "baseline"),
    ("TRD under OMQ's bits: MPQ-DM against OMQ only", 3, "mpqdm", "omq"),
    ("a tenth of the official relation weight: MPQ-DM then against the baseline", 3, "tenth", "baseline"),
    ("MPQ-DM against the baseline", 4, "mpqdm", "baseline"),
    ("OMQ only against the baseline", 4, "omq", "baseline"),
    ("TRD under OMQ's bits: MPQ-DM against OMQ only", 4, "mpqdm", "omq"),
    ("distillation rescues uniform PTQ", 4, "baseline", "ptq"),
]


def load(spec):
    """'name=file,file': (name, RunFolder of the files' folder, merged results)."""
    name, _, files = spec.partition("=")
    paths = [Path(p) for p in files.split(",")]
    if len({p.parent for p in paths}) != 1:
        raise SystemExit(f"error: {name}'s result files must share one folder (their per-image files are read from it)")
    try:
        return name, RunFolder(paths[0].parent), merge_results(paths)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def difference(folder, results, n, arm, base):
    """The paired PSNR difference arm - base (per training seed, image by image), or None if either is missing."""
    a = {r["train_seed"]: folder.per_image(r, "psnr") for r in chosen_runs(results, arm, n)}
    b = {r["train_seed"]: folder.per_image(r, "psnr") for r in chosen_runs(results, base, n)}
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    return interval([a[s] - b[s] for s in seeds]) if seeds else None


def verdict(x, y, names=("the first", "the second")):
    """'holds' (both resolved, same sign), 'flips' (both resolved, opposite signs), 'unresolved on <name>'
    (resolved on the other model only), 'unresolved on both', or 'not run'."""
    if x is None or y is None:
        return "not run"
    if resolved(x) and resolved(y):
        return "holds" if (x["mean"] > 0) == (y["mean"] > 0) else "flips"
    if resolved(x) or resolved(y):
        return "unresolved on " + (names[1] if resolved(x) else names[0])
    return "unresolved on both"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="name=results file(s) of the first model")
    parser.add_argument("--b", required=True, help="name=results file(s) of the second model")
    parser.add_argument("--tenth", nargs=2, default=["mpqdm_lam20", "mpqdm_lam6.67"], metavar=("CELL_A", "CELL_B"),
                        help="each model's MPQ-DM cell at a tenth of its official relation weight (distill.py --lam "
                             "auto: 200 on the digits model, 66.7 on the photograph model)")
    args = parser.parse_args(argv)
    models = [load(args.a), load(args.b)]
    print(f"| setting | verdict | {models[0][0]}: PSNR difference, dB | {models[1][0]}: PSNR difference, dB | on both |")
    print("|---|---|---|---|---|")
    for what, n, arm, base in VERDICTS:
        d = [difference(folder, results, n, *(tenth if c == "tenth" else c for c in (arm, base)))
             for (_, folder, results), tenth in zip(models, args.tenth)]
        cells = [format_interval(x, "+.2f") + (" **resolved**" if resolved(x) else "") if x else "not run" for x in d]
        arms, bases = ("/".join(args.tenth) if c == "tenth" else c for c in (arm, base))
        print(f"| W{n}A4 | {what} ({arms} − {bases}) | {cells[0]} | {cells[1]} | "
              f"{verdict(*d, names=(models[0][0], models[1][0]))} |")


if __name__ == "__main__":
    main()
