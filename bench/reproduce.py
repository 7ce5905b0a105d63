"""Reproduces the paper's comparison on the embedded default, end to end through the four scripts
(quantize.py -> distill.py -> sample.py -> evaluate.py), with fixed seeds. Writes a Markdown table and
a JSON file (FID, IS, precision, recall, samples per row, wall time of each stage) and can run any
subset of cells; finished stages are reused (delete --out to start over).

    python bench/reproduce.py                                  # every cell at W2A4, W3A4, W4A4
    python bench/reproduce.py --bits 2 --cells fp,baseline,mpqdm   # the README's main job

Cells (method = how the weights are quantized, distillation = what fine-tunes them):
    fp        full precision
    ptq       uniform bits, no distillation
    baseline  uniform bits + LoRA distillation with the MSE only (EfficientDM-style)
    omq       OMQ bits + MSE-only distillation
    trd       uniform bits + MSE + TRD distillation
    mpqdm     OMQ bits + MSE + TRD distillation (MPQ-DM)

The evaluation images use --sample-seed, which is used for nothing else: calibration and
distillation draw their trajectories from seed 0, the eps-MSE checks from seed 10000.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = {  # cell: (quantize method, distillation: None | "off" | "on")
    "fp": (None, None), "ptq": ("uniform", None), "baseline": ("uniform", "off"),
    "omq": ("omq", "off"), "trd": ("uniform", "on"), "mpqdm": ("omq", "on"),
}
NAMES = {"fp": "FP (full precision)", "ptq": "uniform PTQ (no distillation)", "baseline": "EfficientDM-style baseline",
         "omq": "OMQ only", "trd": "TRD only", "mpqdm": "MPQ-DM (OMQ + TRD)"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--bits", default="2,3,4", help="weight bit-widths n (activations: --abits)")
parser.add_argument("--abits", type=int, default=4)
parser.add_argument("--cells", default=",".join(CELLS), help=f"any of {','.join(CELLS)}")
parser.add_argument("--num-images", type=int, default=1000, help="samples per row for the metrics")
parser.add_argument("--sample-seed", type=int, default=1234)
parser.add_argument("--distill-iters", type=int, default=None, help="default: distill.py's")
parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
args = parser.parse_args()
cells = args.cells.split(",")
if unknown := [c for c in cells if c not in CELLS]:
    parser.error(f"unknown cells {unknown}: choose from {list(CELLS)}")
bits = [int(b) for b in args.bits.split(",")]
args.out.mkdir(parents=True, exist_ok=True)
results_path = args.out / "results.json"
results = json.loads(results_path.read_text()) if results_path.exists() else {}


def run(tag, script, *script_args):
    """Runs one stage; returns its wall time. Output goes to logs/<tag>.log."""
    log = args.out / "logs" / f"{tag}.log"
    log.parent.mkdir(exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, script_args)], cwd=ROOT,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{script} failed; see {log}")
    return time.time() - t0


def cell(name, n):
    key = "fp" if name == "fp" else f"W{n}A{args.abits} {name}"
    method, trd = CELLS[name]
    times = {}
    ckpt = None  # fp: sample.py's default model
    if method:
        ckpt = args.out / f"w{n}a{args.abits}_{method}.pt"
        if not ckpt.exists():
            times["quantize"] = run(ckpt.stem + "_quantize", "quantize.py", "--wbits", n, "--abits", args.abits,
                                    "--method", method, "--out", ckpt)
        if trd:
            dckpt = args.out / f"w{n}a{args.abits}_{method}_{'trd' if trd == 'on' else 'mse'}.pt"
            if not dckpt.exists():
                iters = ["--iters", args.distill_iters] if args.distill_iters else []
                times["distill"] = run(dckpt.stem + "_distill", "distill.py", "--qckpt", ckpt, "--trd", trd, "--out", dckpt, *iters)
            ckpt = dckpt
    tag = key.replace(" ", "_")
    samples = args.out / "samples" / tag
    times["sample"] = run(tag + "_sample", "sample.py", *(["--ckpt", ckpt] if ckpt else []), "--num-images", args.num_images,
                          "--seed", args.sample_seed, "--out", samples)
    times["evaluate"] = run(tag + "_evaluate", "evaluate.py", samples / "samples.npz")
    metrics = json.loads((samples / "samples.eval.json").read_text())
    prev = results.get(key, {}).get("seconds", {})
    results[key] = dict(cell=name, wbits=None if name == "fp" else n, abits=None if name == "fp" else args.abits,
                        checkpoint=str(ckpt) if ckpt else "checkpoints/digits_unet.pt", n_samples=metrics["n_samples"],
                        fid=metrics["fid"], sfid=metrics["sfid"], IS=metrics["is"], precision=metrics["precision"],
                        recall=metrics["recall"], feature_network=metrics["feature_network"],
                        seconds={**prev, **times})
    results_path.write_text(json.dumps(results, indent=1))
    r = results[key]
    print(f"{key:28s} FID {r['fid']:8.3f}  IS {r['IS']:6.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}"
          f"  ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})", flush=True)


for n in bits:
    for name in cells:
        if name == "fp" and n != bits[0]:
            continue
        cell(name, n)

# ---- the table, from everything measured so far
rows = ["| setting | method | FID (in-domain) | sFID (in-domain) | IS (in-domain) | precision | recall | samples | time (q / d / s / e, s) |",
        "|---|---|---|---|---|---|---|---|---|"]
order = sorted(results.items(), key=lambda kv: (kv[1]["wbits"] or 0, list(CELLS).index(kv[1]["cell"])))
for key, r in order:
    t = r["seconds"]
    stage = " / ".join(f"{t[s]:.0f}" if s in t else "-" for s in ("quantize", "distill", "sample", "evaluate"))
    setting = "FP32" if r["wbits"] is None else f"W{r['wbits']}A{r['abits']}"
    rows.append(f"| {setting} | {NAMES[r['cell']]} | {r['fid']:.3f} | {r['sfid']:.3f} | {r['IS']:.3f} | "
                f"{r['precision']:.3f} | {r['recall']:.3f} | {r['n_samples']} | {stage} |")
(args.out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
base = {r["wbits"]: r["fid"] for r in results.values() if r["cell"] == "baseline"}
for r in results.values():
    if r["cell"] == "mpqdm" and r["wbits"] in base:
        print(f"W{r['wbits']}A{r['abits']}: MPQ-DM FID {r['fid']:.3f} vs baseline {base[r['wbits']]:.3f} "
              f"({100 * (base[r['wbits']] - r['fid']) / base[r['wbits']]:+.0f}% lower)")
