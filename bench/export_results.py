"""Copies a finished bench/reproduce.py --out into the committed results: one w<n>a<m>_sweep.json per
weight width (its runs, its searches, and the folder's model, rule and branch start; fp and fp2 in
each), every run's per-image file into <to>/yardstick_paired/ (paired_file rewritten to point there),
and the folder's tables as <to>/yardstick.md. The committed files are what bench/reproduce.py reads its
default multipliers from (--committed), and what --start-from starts a new --out from.

    python bench/export_results.py --out runs/photos_yard --to bench/results/photos

A width already committed in <to> is refused unless --force (it would replace the file).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.runs import RESULTS_FORMAT, RunFolder  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the bench/reproduce.py --out")
    parser.add_argument("--to", type=Path, required=True, help="the committed folder, e.g. bench/results/photos")
    parser.add_argument("--widths", default=None, help="comma-separated weight widths to export (default: every one)")
    parser.add_argument("--force", action="store_true", help="replace widths already committed in --to")
    parser.add_argument("--no-tables", action="store_true", help="leave <to>/yardstick.md as it is")
    args = parser.parse_args(argv)
    folder = RunFolder(args.out)
    results = folder.load_results() if folder.results_path.is_file() else {}
    if not results.get("runs"):
        parser.error(f"no runs in {folder.results_path}")
    abits = {r["abits"] for r in results["runs"].values() if r.get("abits")}
    if len(abits) != 1:
        parser.error(f"{folder.results_path} holds runs at activation widths {sorted(abits)}; one is exported at a time")
    abits = abits.pop()
    widths = sorted({r["wbits"] for r in results["runs"].values() if r.get("wbits")})
    if args.widths:
        widths = [n for n in widths if str(n) in args.widths.split(",")]
    targets = {n: args.to / f"w{n}a{abits}_sweep.json" for n in widths}
    if (there := [str(p) for p in targets.values() if p.exists()]) and not args.force:
        parser.error(f"already committed: {', '.join(there)} (--force replaces them)")
    paired = args.to / "yardstick_paired"
    paired.mkdir(parents=True, exist_ok=True)
    for n, target in targets.items():
        mine = {k: dict(r) for k, r in results["runs"].items() if r.get("wbits") in (None, n)}
        for k, r in mine.items():
            if r.get("paired_file"):
                name = k.replace(" ", "_") + ".npz"
                shutil.copyfile(args.out / r["paired_file"], paired / name)
                r["paired_file"] = f"yardstick_paired/{name}"
        export = dict(format=RESULTS_FORMAT, **{k: results[k] for k in ("model", "select_by", "lowrank_init") if k in results},
                      runs=mine, search={k: r for k, r in results["search"].items() if r["wbits"] == n})
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(export, indent=1))
        tmp.replace(target)
        print(f"wrote {target}: {len(mine)} runs, {len(export['search'])} search runs")
    if (args.out / "results.md").is_file() and not args.no_tables:
        shutil.copyfile(args.out / "results.md", args.to / "yardstick.md")
        print(f"wrote {args.to / 'yardstick.md'}")


if __name__ == "__main__":
    main()
