#!/usr/bin/env bash
# Pretrain every method, finetune each with SLF, ALF and AFF, and write the paper's table:
#   $OUT/table.md (rows: methods; columns: SA and RA per scheme, mean ± std over seeds) and $OUT/table.json.
#
#   SCALE=paper  bash reproduce.sh    # SPEC recipe: ResNet-18 (width 64), 1000 epochs, batch 512, PGD-7; GPU
#   SCALE=small  bash reproduce.sh    # 2 CPU cores, about an hour for 2 seeds (see README for what is cut)
#   SCALE=smoke  bash reproduce.sh    # a couple of minutes: checks the script, not the method
#
# Environment: DATASET (cifar10 | cifar100 | folder), DATA_DIR, SEEDS (number of seeds), OUT, METHODS,
# AA=1 (add standard AutoAttack; needs `pip install torchattacks`), PYTHON.
# Resumable: a cell whose results.json exists is skipped; one with a checkpoint continues from it.
set -euo pipefail
cd "$(dirname "$0")"

SCALE=${SCALE:-small}
case "$SCALE" in
  paper) ARGS=(--width 64 --epochs 1000 --batch-size 512 --attack-steps 7)
         DEFAULT_DATASET=cifar10 DEFAULT_DATA_DIR=./data DEFAULT_SEEDS=1 ;;
  small) ARGS=(--subset 5000 --width 8 --epochs 6 --batch-size 128 --attack-steps 3 --warmup-epochs 1
               --eval-subset 1000 --ft-epochs 3 --eval-batch-size 256)
         DEFAULT_DATASET=folder DEFAULT_DATA_DIR=data/cifar10-jpeg DEFAULT_SEEDS=2 ;;
  smoke) ARGS=(--subset 128 --width 4 --epochs 1 --batch-size 32 --attack-steps 1 --warmup-epochs 0
               --eval-subset 64 --eval-steps 2 --ft-epochs 1 --eval-batch-size 128)
         DEFAULT_DATASET=folder DEFAULT_DATA_DIR=data/cifar10-jpeg DEFAULT_SEEDS=1 ;;
  *) echo "reproduce.sh: SCALE must be paper, small or smoke, not '$SCALE'" >&2; exit 2 ;;
esac
DATASET=${DATASET:-$DEFAULT_DATASET}
DATA_DIR=${DATA_DIR:-$DEFAULT_DATA_DIR}
SEEDS=${SEEDS:-$DEFAULT_SEEDS}
OUT=${OUT:-results}
METHODS=${METHODS:-rocl infpos hardneg both}
PYTHON=${PYTHON:-python}
[ "${AA:-0}" = 1 ] && ARGS+=(--autoattack)

start=$(date +%s)
for seed in $(seq 0 $((SEEDS - 1))); do
  for method in $METHODS; do
    dir="$OUT/$method-s$seed"
    if [ -f "$dir/results.json" ]; then echo "== $dir: done, skipped"; continue; fi
    resume=()
    [ -f "$dir/last.pt" ] && resume=(--resume "$dir")
    echo "== $dir"
    "$PYTHON" ainfonce.py --method "$method" --seed "$seed" --dataset "$DATASET" --data-dir "$DATA_DIR" \
      --eval slf alf aff "${ARGS[@]}" --out "$dir" "${resume[@]}"
  done
done

"$PYTHON" - "$OUT" "$SCALE" "$SEEDS" "$METHODS" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, statistics, sys
out, scale, seeds, methods, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), int(sys.argv[5])
runs = {m: [json.load(open(f"{out}/{m}-s{s}/results.json")) for s in range(seeds)] for m in methods}
cols = [f"{scheme}_{k}" for scheme in ("slf", "alf", "aff") for k in ("sa", "ra", "aa")
        if any(f"{scheme}_{k}" in r for rs in runs.values() for r in rs)]

def cell(values):
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

r0 = runs[methods[0]][0]
lines = [f"SCALE={scale}: {r0['dataset']}, {r0['n_train']} training images, ResNet-18 width {r0['width']}, "
         f"{r0['epochs']} epochs, batch {r0['batch_size']}, {r0['attack_steps']}-step training attack; "
         f"RA = PGD-{r0['eval_steps']} at eps {r0['eval_eps'] * 255:.0f}/255, step {r0['eval_step'] * 255:.2f}/255, "
         f"on {r0['n_test']} test images; last epoch of every finetuning; "
         + (f"mean ± std over {seeds} seeds." if seeds > 1 else "one seed."),
         "", "| method | " + " | ".join(c.replace("_", " ").upper() for c in cols) + " |",
         "|---|" + "---:|" * len(cols)]
for m, rs in runs.items():
    lines.append(f"| {m} | " + " | ".join(cell([r[c] for r in rs]) for c in cols) + " |")
guards = all(r["guards"]["ok"] for rs in runs.values() for r in rs)
lines += ["", f"Robustness guards (RA <= SA, RA falling in eps, ~0 at 64/255, more steps no better): "
              f"{'all passed' if guards else 'FAILED for some run: see results.json'}. "
              f"Wall time of this invocation: {wall / 60:.1f} min."]
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
json.dump({"scale": scale, "seeds": seeds, "wall_s": wall, "runs": runs}, open(f"{out}/table.json", "w"), indent=1)
print("\n".join(lines))
EOF
