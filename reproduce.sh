#!/usr/bin/env bash
# Pretrain every method, evaluate each, and write the paper's table: $OUT/table.md (rows: methods; columns: SA and RA
# per scheme; the mean over seeds with its 95 % confidence interval, and each method minus the base's symmetric loss
# paired by seed), $OUT/table.json and, with matplotlib installed, $OUT/curves.png.
#
#   SCALE=paper  bash reproduce.sh   # the paper's recipe: ResNet-18 (width 64), the base's epochs and attack; GPUs
#   SCALE=medium bash reproduce.sh   # width 64, batch 512, 40 epochs, --amp, SLF (not measured: no GPU yet)
#   SCALE=cpu    bash reproduce.sh   # 2 CPU cores, 5 seeds, SLF on all 10,000 test images (README: the CPU table)
#   SCALE=small  bash reproduce.sh   # 2 CPU cores: 62 min for 2 seeds, 1,000 test images, SLF/ALF/AFF
#   SCALE=smoke  bash reproduce.sh   # a couple of minutes: checks the script, not the method
#   BASE=advcl SCALE=small bash reproduce.sh   # the same table for A-InfoNCE on AdvCL
#
# Each scale is ainfonce.py's --preset of that name. Environment: DATASET (cifar10 | cifar100 | stl10 | folder;
# default cifar10, downloaded by torchvision), DATA_DIR (default ./data), SEEDS (number of seeds), OUT (default
# results/$SCALE, results/$SCALE-advcl for BASE=advcl), METHODS, AA=1 (add standard AutoAttack; pip install
# pyautoattack), EVAL_THREATS (e.g. "linf:8/255 l2:0.5": RA under each), PROTOCOL (asym-rocl | asym-advcl |
# robustssl), BASE (rocl | advcl), PSEUDO_LABELS (AdvCL base: a pickle of pseudo-labels; default: k-means of a simclr
# run of this scale, $OUT/simclr-s0, made first), TRANSFER_TO (a data set: a second evaluation of every run on it,
# finetuned there) with TRANSFER_DIR, PYTHON. Relative paths are relative to the directory you run it from.
# Resumable: a cell with a checkpoint continues through `--resume`, which refuses a checkpoint made with other
# arguments (another SCALE in the same OUT) or on other training images (another DATA_DIR), and finishes its training
# and evaluation. Each cell's evaluation names the results file of exactly what it asked for (ainfonce.py prints
# "results: PATH"); the table reads those files.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

SCALE=${SCALE:-small}
case "$SCALE" in
  paper|medium|smoke) DEFAULT_SEEDS=1 ;;
  small) DEFAULT_SEEDS=2 ;;
  cpu) DEFAULT_SEEDS=5 ;;
  *) echo "reproduce.sh: SCALE must be paper, medium, cpu, small or smoke, not '$SCALE'" >&2; exit 2 ;;
esac
DATASET=${DATASET:-cifar10}
DATA_DIR=${DATA_DIR:-./data}
SEEDS=${SEEDS:-$DEFAULT_SEEDS}
METHODS=${METHODS:-rocl infpos hardneg both}
PYTHON=${PYTHON:-python}
BASE=${BASE:-rocl}
case "$BASE" in rocl|advcl) ;; *) echo "reproduce.sh: BASE must be rocl or advcl, not '$BASE'" >&2; exit 2 ;; esac
if [ "$BASE" = advcl ]; then  # scales and bases never share a directory
  OUT=${OUT:-results/$SCALE-advcl}
else
  OUT=${OUT:-results/$SCALE}
fi
TRAIN=(--preset "$SCALE")
EVALUATE=()  # flags of the evaluation, also given to the TRANSFER_TO evaluation
[ "${AA:-0}" = 1 ] && EVALUATE+=(--autoattack)
[ -n "${EVAL_THREATS:-}" ] && EVALUATE+=(--eval-threats $EVAL_THREATS)
[ -n "${PROTOCOL:-}" ] && EVALUATE+=(--protocol "$PROTOCOL")

continue_hint() {  # the command that continues the whole table, with the environment it was started with
  local env="" v
  for v in SCALE BASE DATASET DATA_DIR SEEDS OUT METHODS AA EVAL_THREATS PROTOCOL PSEUDO_LABELS TRANSFER_TO \
           TRANSFER_DIR PYTHON; do
    [ -n "${!v:-}" ] && env+="$v=$(printf %q "${!v}") "
  done
  echo "reproduce.sh: interrupted; continue the whole table with: ${env}bash $(printf %q "$0")" >&2
}
trap 'continue_hint; exit 130' INT TERM

# cell NAME ARGS...: one ainfonce invocation, shown as it runs; once it succeeds, its results file is added to $CELLS
# under NAME. An interrupt of ainfonce alone (exit 130) ends the script with the hint too; a Ctrl-C to the script
# runs the trap. A cell that fails (a resume refused: another scale, other images) ends the script before the table.
cell() {
  local name=$1 log rc
  shift
  log=$(mktemp)
  set +e
  "$PYTHON" "$HERE/ainfonce.py" "$@" | tee -i "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 0 ]; then
    printf '%s\t%s\n' "$name" "$(sed -n 's/^results: //p' "$log" | tail -n 1)" >> "$CELLS"
  fi
  rm -f "$log"
  if [ "$rc" != 0 ]; then
    [ "$rc" = 130 ] && continue_hint
    exit "$rc"
  fi
}

mkdir -p "$OUT"
CELLS="$OUT/cells.tsv"
: > "$CELLS"
start=$(date +%s)
if [ "$BASE" = advcl ]; then  # its pseudo-labels: a file, or k-means of a simclr encoder of this scale
  if [ -z "${PSEUDO_LABELS:-}" ]; then
    PSEUDO_LABELS="$OUT/simclr-s0"
    echo "== $PSEUDO_LABELS (the encoder whose features give the AdvCL base its pseudo-labels)"
    simclr=(--method simclr --seed 0 --dataset "$DATASET" --data-dir "$DATA_DIR" "${TRAIN[@]}" --eval none)
    if [ -f "$PSEUDO_LABELS/last.pt" ]; then
      cell simclr --resume "$PSEUDO_LABELS" "${simclr[@]}"
    else
      cell simclr "${simclr[@]}" --out "$PSEUDO_LABELS"
    fi
  fi
  TRAIN+=(--base advcl --pseudo-labels "$PSEUDO_LABELS")
fi
for seed in $(seq 0 $((SEEDS - 1))); do
  for method in $METHODS; do
    dir="$OUT/$method-s$seed"
    echo "== $dir"
    run=(--method "$method" --seed "$seed" --dataset "$DATASET" --data-dir "$DATA_DIR" "${TRAIN[@]}" "${EVALUATE[@]}")
    if [ -f "$dir/last.pt" ]; then  # its arguments must be this table's: --resume refuses others by name
      cell "$method-s$seed" --resume "$dir" "${run[@]}"
    else
      cell "$method-s$seed" "${run[@]}" --out "$dir"
    fi
    if [ -n "${TRANSFER_TO:-}" ]; then  # finetune and evaluate the same encoder on another data set
      cell "$method-s$seed transfer" --eval-only "$dir" --eval-dataset "$TRANSFER_TO" \
        --eval-data-dir "${TRANSFER_DIR:-$DATA_DIR}" "${EVALUATE[@]}" --out "$dir/transfer"
    fi
  done
done

"$PYTHON" - "$OUT" "$SEEDS" "$METHODS" "$(( $(date +%s) - start ))" <<'PY'
import json, math, statistics, sys
from fractions import Fraction
out, seeds, methods, wall = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), int(sys.argv[4])
# Student's t: the 0.975 quantile for 1 to 30 degrees of freedom (beyond: the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval(values):  # the mean and the half-width of its 95 % confidence interval (None for one value)
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return mean, t * sd / math.sqrt(n)


cells = dict(line.rstrip("\n").split("\t") for line in open(f"{out}/cells.tsv"))
runs = {m: [json.load(open(cells[f"{m}-s{s}"])) for s in range(seeds)] for m in methods}
for m, rs in runs.items():  # the second evaluation on TRANSFER_TO, as columns "to <dataset>: ..."
    for s, r in enumerate(rs):
        if f"{m}-s{s} transfer" in cells:
            tr = json.load(open(cells[f"{m}-s{s} transfer"]))
            to = tr["identity"]["data"]["dataset"]
            r.update({f"to {to}: {k}": v for k, v in tr.items() if k.startswith(("slf_", "alf_", "aff_"))})
# every cell must come from the same recipe, data and protocol: the heading below is read from them
same = ("base", "dataset", "subset", "width", "epochs", "batch_size", "attack_steps", "eps")


def unseeded(r):  # what must agree across cells: the data, and the protocol but its seed
    return r["identity"]["data"], {**r["identity"]["protocol"], "seed": 0}


r0 = runs[methods[0]][0]
a0 = r0["training"]["args"]
for m, rs in runs.items():
    for s, r in enumerate(rs):
        a = r["training"]["args"]
        diff = [k for k in same if a.get(k) != a0.get(k)] + (["data or protocol"] if unseeded(r) != unseeded(r0) else [])
        if diff:
            sys.exit(f"reproduce.sh: {out}/{m}-s{s} was made with other arguments than {out}/{methods[0]}-s0 "
                     f"({', '.join(diff)}): it is not a cell of this table; use another OUT")
p, data = r0["identity"]["protocol"], r0["identity"]["data"]
threats = p["threats"]
keys = [f"{sc}_{k}" for sc in ("slf", "alf", "aff") for k in ("sa", "ra", "aa")]
keys = [(k, k.replace("_", " ").upper()) for k in keys]
keys += [(f"{sc}_robust/{t}", f"{sc.upper()} RA {t}") for sc in ("slf", "alf", "aff") for t in threats[1:]]
keys += [(k, k.rpartition(": ")[0] + ": " + k.rpartition(": ")[2].replace("_", " ").upper())  # "to folder: SLF SA"
         for k in r0 if k.startswith("to ") and k.endswith(("_sa", "_ra"))]


def get(r, k):
    k, _, t = k.partition("/")
    return r.get(k) if not t else r.get(k, {}).get(t)


cols = [(k, name) for k, name in keys if all(get(r, k) is not None for rs in runs.values() for r in rs)]


def shown(values, mark=False):  # in points: the mean, and the half-width of its 95 % interval
    mean, half = interval(values)
    if half is None:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {half:.2f}" + (" *" if mark and abs(mean) > half else "")


images = f"{a0['subset']} training images" if a0["subset"] else "all training images"
epochs = f"{a0['epochs']} epoch" + ("s" if a0["epochs"] != 1 else "")
base_name = "A-InfoNCE on AdvCL" if a0.get("base") == "advcl" else "A-InfoNCE on RoCL"
spread = (f"mean ± half-width of its 95 % confidence interval (Student's t over n = {seeds} seeds)" if seeds > 1
          else "one seed: no interval")
heading = (f"{base_name}: {a0['dataset']}, {images}, ResNet-18 width {a0['width']}, {epochs}, "
           f"batch {a0['batch_size']}, {a0['attack_steps']}-step training attack; {p['name']} finetuning; RA = "
           f"PGD-{p['eval_steps']} at {threats[0]}, step {p['eval_step'] * 255:.2f}/255, on {data['n_test']} test "
           f"images" + (f"; AutoAttack: {p['autoattack']}" if p["autoattack"] else "")
           + f"; last epoch of every finetuning; in %, {spread}.")
lines = [heading, "", "| method | " + " | ".join(name for _, name in cols) + " |", "|---|" + "---:|" * len(cols)]
table = {}
for m, rs in runs.items():
    values = {k: [100 * get(r, k) for r in rs] for k, _ in cols}
    table[m] = {k: dict(zip(("mean", "half_width"), interval(v)), n=len(v)) for k, v in values.items()}
    lines.append(f"| {m} | " + " | ".join(shown(values[k]) for k, _ in cols) + " |")
paired = {}
baseline = "rocl"  # the base's symmetric loss
if baseline in runs and seeds > 1 and len(runs) > 1:
    lines += ["", f"Each method minus {baseline}, paired by seed (the same initial weights, data order and "
                  f"augmentations): mean difference ± half-width of its 95 % interval (Student's t, n = {seeds}), in "
                  f"points; * where the interval excludes 0.", "",
              "| method | " + " | ".join(name for _, name in cols) + " |", "|---|" + "---:|" * len(cols)]
    for m, rs in runs.items():
        if m == baseline:
            continue
        diffs = {k: [100 * (get(r, k) - get(b, k)) for r, b in zip(rs, runs[baseline])] for k, _ in cols}
        paired[m] = {}
        for k, v in diffs.items():
            mean, half = interval(v)
            paired[m][k] = {"mean": mean, "half_width": half, "n": len(v), "excludes_0": abs(mean) > half}
        lines.append(f"| {m} | " + " | ".join(shown(diffs[k], mark=True) for k, _ in cols) + " |")
elif baseline in runs and len(runs) > 1:
    lines += ["", f"One seed: no paired differences with {baseline} (SEEDS=2 or more gives them)."]
failed = [f"{m}-s{s} ({'; '.join(r['slf_guards']['failed'])})" for m, rs in runs.items() for s, r in enumerate(rs)
          if "slf_guards" in r and not r["slf_guards"]["ok"]]
verdict = "all passed" if not failed else "FAILED for " + ", ".join(failed)
lines += ["", f"Robustness guards (RA <= SA, RA falling in eps, ~0 at 64/255, more steps no better): {verdict}. "
              f"Wall time of this invocation: {wall / 60:.1f} min."]
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
json.dump({"seeds": seeds, "wall_s": wall, "cells": cells, "table": table, "paired": paired, "baseline": baseline,
           "runs": runs}, open(f"{out}/table.json", "w"), indent=1)
print("\n".join(lines))

try:  # curves: training loss and kNN accuracy per epoch, robust accuracy against eps per threat norm (SLF)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
except ImportError:
    print("no figure: pip install matplotlib for curves.png (loss, kNN accuracy, RA against eps)")
    sys.exit(0)


def band(ax, xs, per_seed, label, marker):  # the mean over seeds, and its min-max over seeds shaded
    mean = [statistics.mean(v) for v in per_seed]
    ax.plot(xs, mean, marker=marker, label=label)
    if seeds > 1:
        ax.fill_between(xs, [min(v) for v in per_seed], [max(v) for v in per_seed], alpha=0.2)


norms = sorted({t.split(":")[0] for t in threats})
logs = {m: [[json.loads(line) for line in open(f"{out}/{m}-s{s}/log.jsonl")] for s in range(seeds)] for m in methods}
has_knn = any("knn" in rec for m in methods for rec in logs[m][0])
panels = 1 + has_knn + len(norms)
fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6))
for m in methods:
    epochs = [rec["epoch"] for rec in logs[m][0]]
    band(axes[0], epochs, [[log[i]["loss"] for log in logs[m]] for i in range(len(epochs))], m, ".")
    if has_knn:
        at = [i for i, rec in enumerate(logs[m][0]) if "knn" in rec]
        band(axes[1], [epochs[i] for i in at], [[100 * log[i]["knn"] for log in logs[m]] for i in at], m, "o")
    for ax, norm in zip(axes[1 + has_knn:], norms):  # accuracy at eps 0 is SA
        scale = 255 if norm == "linf" else 1
        points = [(0.0, [100 * r["slf_sa"] for r in runs[m]])]
        points += [(float(Fraction(t.split(":")[1])) * scale, [100 * r["slf_robust"][t] for r in runs[m]])
                   for t in threats if t.startswith(norm + ":")]
        points.sort()
        band(ax, [x for x, _ in points], [v for _, v in points], m, "o")
axes[0].set(xlabel="epoch", ylabel="pretraining loss", title="loss")
if has_knn:
    axes[1].set(xlabel="epoch", ylabel="kNN accuracy (%)", title="kNN monitor (k 200, cosine)")
for ax in axes[:1 + has_knn]:  # epochs are whole numbers
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
for ax, norm in zip(axes[1 + has_knn:], norms):
    ax.set(xlabel="eps (x/255)" if norm == "linf" else "eps (L2)", ylabel="SLF accuracy (%)",
           title=f"SLF RA, {norm} PGD")
for ax in axes:
    ax.legend(fontsize=8)
fig.suptitle("mean over seeds; shaded: min to max" if seeds > 1 else "one seed", fontsize=9)
fig.tight_layout()
fig.savefig(f"{out}/curves.png", dpi=110)
print(f"figure: {out}/curves.png")
PY
