#!/usr/bin/env bash
# A/B of a whole training run between an earlier commit and the working tree: the same bnp.train
# overrides at both, alternated in one session (order swapped every repeat, since the machine's speed
# drifts), printing each run's samples/s. Tells a slowdown of the code from one of the machine.
#   bash benchmarks/ab_run.sh <commit> <repeats> <bnp.train overrides...> > results/bench/ab-run-<name>.md
set -euo pipefail
old=$1; repeats=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d); out=$(mktemp -d)
git -C "$root" worktree add -q --detach "$tree" "$old"
trap 'git -C "$root" worktree remove --force "$tree"; rm -rf "$out"' EXIT
echo "A/B of one bnp.train run: $old (old) vs $(git -C "$root" rev-parse --short HEAD) + working tree (new), $(date -u '+%Y-%m-%d %H:%M') UTC"
echo "command: \`bash benchmarks/ab_run.sh $old $repeats $*\`"
echo; echo "| run | side | status | samples/s | training s |"; echo "| --- | --- | --- | ---: | ---: |"
for i in $(seq "$repeats"); do
  for side in $([ $((i % 2)) = 1 ] && echo "old new" || echo "new old"); do
    dir=$([ "$side" = old ] && echo "$tree" || echo "$root")
    (cd "$dir" && WANDB_MODE=offline PYTHONPATH="$dir" "$root/.venv/bin/python" -m bnp.train "$@" logger=none \
      "hydra.run.dir=$out/$side$i" "out_root=$out" > "$out/$side$i.log" 2>&1)
    "$root/.venv/bin/python" -c "import json,sys; s=json.load(open(sys.argv[1])); \
print(f\"| $i | $side | {s['status']} | {s['samples_per_s']:.0f} | {s['wall_time_s']:.1f} |\")" "$out/$side$i/summary.json"
  done
done
