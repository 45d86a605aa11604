#!/usr/bin/env bash
# Pretrain every method, evaluate each, and write the paper's table: $OUT/table.md (rows: methods; columns: SA and RA
# per scheme, mean ± std over seeds), $OUT/table.json and, with matplotlib installed, $OUT/curves.png.
#
#   SCALE=paper  bash reproduce.sh   # the paper's recipe: ResNet-18 (width 64), 1000 epochs, batch 512, PGD-7; GPUs
#   SCALE=medium bash reproduce.sh   # width 64, batch 512, PGD-7, 40 epochs, SLF: about 20 min on one H100 (README)
#   SCALE=small  bash reproduce.sh   # 2 CPU cores, about 75 minutes for 2 seeds (see README for what is cut)
#   SCALE=smoke  bash reproduce.sh   # a couple of minutes: checks the script, not the method
#
# Environment: DATASET (cifar10 | cifar100 | stl10 | folder), DATA_DIR, SEEDS (number of seeds), OUT (default
# results/$SCALE), METHODS, AA=1 (add standard AutoAttack; pip install pyautoattack), EVAL_THREATS (e.g.
# "linf:8/255 l2:0.5": RA under each), PROTOCOL (asym-rocl | robustssl), TRANSFER_TO (a data set: a second
# evaluation of every run on it, finetuned there) with TRANSFER_DIR, PYTHON.
# Resumable: a cell with a checkpoint continues through `--resume`, which refuses a checkpoint made with other
# arguments (another SCALE in the same OUT), and finishes its training and evaluation.
set -euo pipefail
cd "$(dirname "$0")"

SCALE=${SCALE:-small}
case "$SCALE" in  # TRAIN: pretraining flags; EVALUATE: evaluation flags (also those of the TRANSFER_TO evaluation)
  paper)  TRAIN=(--width 64 --epochs 1000 --batch-size 512 --attack-steps 7)
          EVALUATE=(--eval slf alf aff)
          DEFAULT_DATASET=cifar10 DEFAULT_DATA_DIR=./data DEFAULT_SEEDS=1 ;;
  medium) TRAIN=(--width 64 --epochs 40 --warmup-epochs 2 --batch-size 512 --attack-steps 7 --amp)
          EVALUATE=(--eval slf)
          DEFAULT_DATASET=folder DEFAULT_DATA_DIR=data/cifar10-jpeg DEFAULT_SEEDS=1 ;;
  small)  TRAIN=(--subset 5000 --width 8 --epochs 6 --batch-size 128 --attack-steps 3 --warmup-epochs 1)
          EVALUATE=(--eval slf alf aff --eval-subset 1000 --ft-epochs 3 --eval-batch-size 256)
          DEFAULT_DATASET=folder DEFAULT_DATA_DIR=data/cifar10-jpeg DEFAULT_SEEDS=2 ;;
  smoke)  TRAIN=(--subset 128 --width 4 --epochs 1 --batch-size 32 --attack-steps 1 --warmup-epochs 0)
          EVALUATE=(--eval slf alf aff --eval-subset 64 --eval-steps 2 --ft-epochs 1 --eval-batch-size 128)
          DEFAULT_DATASET=folder DEFAULT_DATA_DIR=data/cifar10-jpeg DEFAULT_SEEDS=1 ;;
  *) echo "reproduce.sh: SCALE must be paper, medium, small or smoke, not '$SCALE'" >&2; exit 2 ;;
esac
DATASET=${DATASET:-$DEFAULT_DATASET}
DATA_DIR=${DATA_DIR:-$DEFAULT_DATA_DIR}
SEEDS=${SEEDS:-$DEFAULT_SEEDS}
OUT=${OUT:-results/$SCALE}
METHODS=${METHODS:-rocl infpos hardneg both}
PYTHON=${PYTHON:-python}
[ "${AA:-0}" = 1 ] && EVALUATE+=(--autoattack)
[ -n "${EVAL_THREATS:-}" ] && EVALUATE+=(--eval-threats $EVAL_THREATS)
[ -n "${PROTOCOL:-}" ] && EVALUATE+=(--protocol "$PROTOCOL")

continue_hint() {  # the command that continues the whole table, with the environment it was started with
  local env="" v
  for v in SCALE DATASET DATA_DIR SEEDS OUT METHODS AA EVAL_THREATS PROTOCOL TRANSFER_TO TRANSFER_DIR PYTHON; do
    [ -n "${!v:-}" ] && env+="$v=$(printf %q "${!v}") "
  done
  echo "reproduce.sh: interrupted; continue the whole table with: ${env}bash reproduce.sh" >&2
}
cell() {  # one ainfonce invocation; an interrupt (exit 130, or Ctrl-C to the script) ends the script with the hint
  "$PYTHON" ainfonce.py "$@" || { rc=$?; [ "$rc" = 130 ] && continue_hint; exit "$rc"; }
}
trap 'continue_hint; exit 130' INT TERM

start=$(date +%s)
for seed in $(seq 0 $((SEEDS - 1))); do
  for method in $METHODS; do
    dir="$OUT/$method-s$seed"
    echo "== $dir"
    run=(--method "$method" --seed "$seed" --dataset "$DATASET" --data-dir "$DATA_DIR" "${TRAIN[@]}" "${EVALUATE[@]}")
    if [ -f "$dir/last.pt" ]; then  # its arguments must be this table's: --resume refuses others by name
      cell --resume "$dir" "${run[@]}"
    else
      cell "${run[@]}" --out "$dir"
    fi
    if [ -n "${TRANSFER_TO:-}" ]; then  # finetune and evaluate the same encoder on another data set
      cell --eval-only "$dir" --eval-dataset "$TRANSFER_TO" --eval-data-dir "${TRANSFER_DIR:-$DATA_DIR}" \
        "${EVALUATE[@]}" --out "$dir/transfer"
    fi
  done
done

"$PYTHON" - "$OUT" "$SEEDS" "$METHODS" "$(( $(date +%s) - start ))" <<'PY'
import json, os, statistics, sys
from fractions import Fraction
out, seeds, methods, wall = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), int(sys.argv[4])
runs = {m: [json.load(open(f"{out}/{m}-s{s}/results.json")) for s in range(seeds)] for m in methods}
for m, rs in runs.items():  # the second evaluation on TRANSFER_TO, as columns "to:<dataset> ..."
    for s, r in enumerate(rs):
        t = f"{out}/{m}-s{s}/transfer/results.json"
        if os.path.exists(t):
            tr = json.load(open(t))
            r.update({f"to {tr['protocol']['eval_dataset']}: {k}": v for k, v in tr.items() if k.startswith(("slf_", "alf_", "aff_"))})
# every cell must come from the same recipe and the same protocol: the heading below is read from them
same = ("dataset", "subset", "width", "epochs", "batch_size", "attack_steps", "eps")
r0 = runs[methods[0]][0]
for m, rs in runs.items():
    for s, r in enumerate(rs):
        diff = [k for k in same if r.get(k) != r0.get(k)] + (["protocol"] if {**r["protocol"], "seed": 0} != {**r0["protocol"], "seed": 0} else [])
        if diff:
            sys.exit(f"reproduce.sh: {out}/{m}-s{s} was made with other arguments than {out}/{methods[0]}-s0 "
                     f"({', '.join(diff)}): it is not a cell of this table; use another OUT")
p, threats = r0["protocol"], r0["protocol"]["threats"]
keys = [f"{sc}_{k}" for sc in ("slf", "alf", "aff") for k in ("sa", "ra", "aa")]
keys = [(k, k.replace("_", " ").upper()) for k in keys] + [(f"{sc}_robust/{t}", f"{sc.upper()} RA {t}") for sc in ("slf", "alf", "aff") for t in threats[1:]]
keys += [(k, k.rpartition(": ")[0] + ": " + k.rpartition(": ")[2].replace("_", " ").upper())  # "to folder: SLF SA"
         for k in r0 if k.startswith("to ") and k.endswith(("_sa", "_ra"))]

def get(r, k):
    k, _, t = k.partition("/")
    return r.get(k) if not t else r.get(k, {}).get(t)

cols = [(k, name) for k, name in keys if all(get(r, k) is not None for rs in runs.values() for r in rs)]

def cell(values):
    values = [100 * v for v in values]
    return f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

lines = [f"{r0['dataset']}, {r0['subset'] or 'all'} training images, ResNet-18 width {r0['width']}, {r0['epochs']} epochs, "
         f"batch {r0['batch_size']}, {r0['attack_steps']}-step training attack; {p['name']} finetuning; RA = "
         f"PGD-{p['eval_steps']} at {threats[0]}, step {p['eval_step'] * 255:.2f}/255, on {p['n_test']} test images"
         + (f"; AutoAttack: {p['autoattack']}" if p["autoattack"] else "") + "; last epoch of every finetuning; "
         + (f"mean ± std over {seeds} seeds." if seeds > 1 else "one seed."),
         "", "| method | " + " | ".join(name for _, name in cols) + " |", "|---|" + "---:|" * len(cols)]
for m, rs in runs.items():
    lines.append(f"| {m} | " + " | ".join(cell([get(r, k) for r in rs]) for k, _ in cols) + " |")
guards = all(r["slf_guards"]["ok"] for rs in runs.values() for r in rs if "slf_guards" in r)
lines += ["", f"Robustness guards (RA <= SA, RA falling in eps, ~0 at 64/255, more steps no better): "
              f"{'all passed' if guards else 'FAILED for some run: see results.json'}. "
              f"Wall time of this invocation: {wall / 60:.1f} min."]
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
json.dump({"seeds": seeds, "wall_s": wall, "runs": runs}, open(f"{out}/table.json", "w"), indent=1)
print("\n".join(lines))

try:  # curves: training loss and kNN accuracy per epoch, robust accuracy against eps per threat norm (SLF)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("no figure: pip install matplotlib for curves.png (loss, kNN accuracy, RA against eps)")
    sys.exit(0)
norms = sorted({t.split(":")[0] for t in threats})
fig, axes = plt.subplots(1, 2 + len(norms), figsize=(4.5 * (2 + len(norms)), 3.6))
for m in methods:
    logs = [[json.loads(l) for l in open(f"{out}/{m}-s{s}/log.jsonl")] for s in range(seeds)]
    epochs = [r["epoch"] for r in logs[0]]
    axes[0].plot(epochs, [statistics.mean(log[i]["loss"] for log in logs) for i in range(len(epochs))], marker=".", label=m)
    knn = [(r["epoch"], statistics.mean(log[i]["knn"] for log in logs)) for i, r in enumerate(logs[0]) if "knn" in r]
    if knn:
        axes[1].plot(*zip(*knn), marker="o", label=m)
    for ax, norm in zip(axes[2:], norms):  # accuracy at eps 0 is SA
        pts = [(0.0, statistics.mean(r["slf_sa"] for r in runs[m]))] + [
            (float(Fraction(t.split(":")[1])) * (255 if norm == "linf" else 1), statistics.mean(r["slf_robust"][t] for r in runs[m]))
            for t in threats if t.startswith(norm + ":")]
        ax.plot(*zip(*sorted(pts)), marker="o", label=m)
axes[0].set(xlabel="epoch", ylabel="pretraining loss", title="loss")
axes[1].set(xlabel="epoch", ylabel="kNN accuracy", title="kNN monitor (k 200, cosine)")
for ax, norm in zip(axes[2:], norms):
    ax.set(xlabel="eps (x/255)" if norm == "linf" else "eps (L2)", ylabel="SLF accuracy", title=f"SLF RA, {norm} PGD")
for ax in axes:
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{out}/curves.png", dpi=110)
print(f"figure: {out}/curves.png")
PY
