"""Reproduces the paper's comparison on the embedded default, end to end through the four scripts
(quantize.py -> distill.py -> sample.py -> evaluate.py), with fixed seeds. Writes a Markdown table and
a JSON file (FID, IS, precision, recall, samples per row, wall time of each stage) and can run any
subset of cells; finished quantize/distill stages are reused (delete --out to start over).

Two columns measure fidelity to the FP model rather than quality against the real digits (a
quantized model is meant to reproduce its FP model, and FID against real data can improve when it
does not): "FID vs FP", the in-domain FID between the row's samples and the FP model's samples of
the same seed, and "eps MSE", the held-out one-step noise-prediction error against the FP model
that quantize.py/distill.py report.

    python bench/reproduce.py                                  # every cell at W2A4, W3A4, W4A4
    python bench/reproduce.py --bits 2 --cells fp,baseline,mpqdm   # the README's main job

Cells (method = how the weights are quantized, distillation = what fine-tunes them):
    fp        full precision
    fp2       full precision, sample seed + 1: the seed-to-seed noise of every FID figure
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
    "fp": (None, None), "fp2": (None, None), "ptq": ("uniform", None), "baseline": ("uniform", "off"),
    "omq": ("omq", "off"), "trd": ("uniform", "on"), "mpqdm": ("omq", "on"),
}
NAMES = {"fp": "FP (full precision)", "fp2": "FP, sample seed + 1", "ptq": "uniform PTQ (no distillation)", "baseline": "EfficientDM-style baseline",
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


def fp_reference():
    """The FP model's samples at --sample-seed, which every row's "FID vs FP" is measured against;
    the fp cell is run first when it has not been, or was run with another seed or count."""
    fp = results.get("fp", {})
    if (fp.get("sample_seed"), fp.get("n_samples")) != (args.sample_seed, args.num_images):
        cell("fp", bits[0])
    return args.out / "samples" / "fp" / "samples.npz"


def cell(name, n):
    key = name if name.startswith("fp") else f"W{n}A{args.abits} {name}"
    method, trd = CELLS[name]
    times = {}
    ckpt = None  # fp: sample.py's default model
    eps_mse = None
    if method:
        ckpt = args.out / f"w{n}a{args.abits}_{method}.pt"
        if not ckpt.exists():
            times["quantize"] = run(ckpt.stem + "_quantize", "quantize.py", "--wbits", n, "--abits", args.abits,
                                    "--method", method, "--out", ckpt)
        eps_mse = json.loads(ckpt.with_suffix(".json").read_text())["eps_mse"]
        if trd:
            dckpt = args.out / f"w{n}a{args.abits}_{method}_{'trd' if trd == 'on' else 'mse'}.pt"
            if not dckpt.exists():
                iters = ["--iters", args.distill_iters] if args.distill_iters else []
                times["distill"] = run(dckpt.stem + "_distill", "distill.py", "--qckpt", ckpt, "--trd", trd, "--out", dckpt, *iters)
            ckpt = dckpt
            eps_mse = json.loads(ckpt.with_suffix(".json").read_text())["eps_mse_after"]
    tag = key.replace(" ", "_")
    samples = args.out / "samples" / tag
    seed = args.sample_seed + 1 if name == "fp2" else args.sample_seed
    times["sample"] = run(tag + "_sample", "sample.py", *(["--ckpt", ckpt] if ckpt else []), "--num-images", args.num_images,
                          "--seed", seed, "--out", samples, "--force")
    times["evaluate"] = run(tag + "_evaluate", "evaluate.py", samples / "samples.npz")
    metrics = json.loads((samples / "samples.eval.json").read_text())
    fid_vs_fp = None
    if name != "fp":
        run(tag + "_evaluate_vs_fp", "evaluate.py", samples / "samples.npz", "--ref", fp_reference(),
            "--out", samples / "vs_fp.eval.json")
        fid_vs_fp = json.loads((samples / "vs_fp.eval.json").read_text())["fid"]
    prev = results.get(key, {}).get("seconds", {})
    results[key] = dict(cell=name, wbits=n if method else None, abits=args.abits if method else None, sample_seed=seed,
                        checkpoint=str(ckpt) if ckpt else "checkpoints/digits_unet.pt", n_samples=metrics["n_samples"],
                        fid=metrics["fid"], fid_vs_fp=fid_vs_fp, eps_mse=eps_mse, sfid=metrics["sfid"], IS=metrics["is"],
                        precision=metrics["precision"], recall=metrics["recall"],
                        feature_network=metrics["feature_network"], seconds={**prev, **times})
    results_path.write_text(json.dumps(results, indent=1))
    r = results[key]
    print(f"{key:28s} FID {r['fid']:8.3f}  IS {r['IS']:6.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}"
          + (f"  FID vs FP {fid_vs_fp:.3f}" if fid_vs_fp is not None else "")
          + f"  ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})", flush=True)


for n in bits:
    for name in cells:
        if name.startswith("fp") and n != bits[0]:
            continue
        cell(name, n)

# ---- the table, from everything measured so far
rows = ["| setting | method | FID (in-domain) | FID vs FP (in-domain) | eps MSE vs FP | sFID (in-domain) | IS (in-domain) "
        "| precision | recall | samples | time (q / d / s / e, s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
order = sorted(results.items(), key=lambda kv: (kv[1]["wbits"] or 0, list(CELLS).index(kv[1]["cell"])))
fmt = lambda v, f: "-" if v is None else format(v, f)
for key, r in order:
    t = r["seconds"]
    stage = " / ".join(f"{t[s]:.0f}" if s in t else "-" for s in ("quantize", "distill", "sample", "evaluate"))
    setting = "FP32" if r["wbits"] is None else f"W{r['wbits']}A{r['abits']}"
    rows.append(f"| {setting} | {NAMES[r['cell']]} | {r['fid']:.3f} | {fmt(r.get('fid_vs_fp'), '.3f')} | "
                f"{fmt(r.get('eps_mse'), '.4f')} | {r['sfid']:.3f} | {r['IS']:.3f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['n_samples']} | {stage} |")
(args.out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
base = {r["wbits"]: r["fid"] for r in results.values() if r["cell"] == "baseline"}
for r in results.values():
    if r["cell"] == "mpqdm" and r["wbits"] in base:
        change = 100 * (r["fid"] - base[r["wbits"]]) / base[r["wbits"]]
        print(f"W{r['wbits']}A{r['abits']}: MPQ-DM FID {r['fid']:.3f} vs baseline {base[r['wbits']]:.3f} "
              f"({abs(change):.0f}% {'lower' if change < 0 else 'higher'})")
