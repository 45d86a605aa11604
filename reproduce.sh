#!/usr/bin/env bash
# Pretrain every method, evaluate each, and write the paper's table:
#   $OUT/table.md (rows: methods; columns: SA and RA per scheme, mean ± std over seeds) and $OUT/table.json.
#
#   SCALE=paper  bash reproduce.sh   # the paper's recipe: ResNet-18 (width 64), 1000 epochs, batch 512, PGD-7; GPUs
#   SCALE=medium bash reproduce.sh   # width 64, batch 512, PGD-7, 40 epochs, SLF: about 20 min on one H100 (README)
#   SCALE=small  bash reproduce.sh   # 2 CPU cores, about an hour for 2 seeds (see README for what is cut)
#   SCALE=smoke  bash reproduce.sh   # a couple of minutes: checks the script, not the method
#
# Environment: DATASET (cifar10 | cifar100 | stl10 | folder), DATA_DIR, SEEDS (number of seeds), OUT, METHODS,
# AA=1 (add standard AutoAttack; pip install pyautoattack), EVAL_THREATS (e.g. "linf:8/255 l2:0.5": RA under each),
# TRANSFER_TO (a data set: a second evaluation of every run on it, finetuned there) with TRANSFER_DIR, PYTHON.
# Resumable: a cell with a checkpoint continues through `--resume`, which finishes its training and evaluation.
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
OUT=${OUT:-results}
METHODS=${METHODS:-rocl infpos hardneg both}
PYTHON=${PYTHON:-python}
[ "${AA:-0}" = 1 ] && EVALUATE+=(--autoattack)
[ -n "${EVAL_THREATS:-}" ] && EVALUATE+=(--eval-threats $EVAL_THREATS)

start=$(date +%s)
for seed in $(seq 0 $((SEEDS - 1))); do
  for method in $METHODS; do
    dir="$OUT/$method-s$seed"
    echo "== $dir"
    if [ -f "$dir/last.pt" ]; then  # the checkpoint holds the arguments: continue whatever is missing
      "$PYTHON" ainfonce.py --resume "$dir"
    else
      "$PYTHON" ainfonce.py --method "$method" --seed "$seed" --dataset "$DATASET" --data-dir "$DATA_DIR" \
        "${TRAIN[@]}" "${EVALUATE[@]}" --out "$dir"
    fi
    if [ -n "${TRANSFER_TO:-}" ]; then  # finetune and evaluate the same encoder on another data set
      "$PYTHON" ainfonce.py --eval-only "$dir" --eval-dataset "$TRANSFER_TO" --eval-data-dir "${TRANSFER_DIR:-$DATA_DIR}" \
        "${EVALUATE[@]}" --out "$dir/transfer"
    fi
  done
done

"$PYTHON" - "$OUT" "$SCALE" "$SEEDS" "$METHODS" "$(( $(date +%s) - start ))" <<'PY'
import json, os, statistics, sys
out, scale, seeds, methods, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), int(sys.argv[5])
runs = {m: [json.load(open(f"{out}/{m}-s{s}/results.json")) for s in range(seeds)] for m in methods}
for m, rs in runs.items():  # the second evaluation on TRANSFER_TO, as columns "to:<dataset> ..."
    for s, r in enumerate(rs):
        t = f"{out}/{m}-s{s}/transfer/results.json"
        if os.path.exists(t):
            tr = json.load(open(t))
            r.update({f"to {tr['protocol']['eval_dataset']}: {k}": v for k, v in tr.items() if k.startswith(("slf_", "alf_", "aff_"))})
r0 = runs[methods[0]][0]
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

lines = [f"SCALE={scale}: {r0['dataset']}, {r0['subset'] or 'all'} training images, ResNet-18 width {r0['width']}, "
         f"{r0['epochs']} epochs, batch {r0['batch_size']}, {r0['attack_steps']}-step training attack; RA = "
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
json.dump({"scale": scale, "seeds": seeds, "wall_s": wall, "runs": runs}, open(f"{out}/table.json", "w"), indent=1)
print("\n".join(lines))
PY
