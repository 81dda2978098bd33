#!/usr/bin/env bash
# A/B of BNP's step overhead between an earlier commit and the working tree, alternating runs of
# bench_overhead.py in the same session, the order swapped every repeat (the machine's speed drifts
# within a session, and the ratio depends on its state).
#   bash benchmarks/ab.sh <commit> [batch sizes, default "1 128"] [repeats, default 2] > results/bench/ab-<name>.md
set -euo pipefail
old=$1; sizes=${2:-"1 128"}; repeats=${3:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
git -C "$root" worktree add -q --detach "$tree" "$old"
trap 'git -C "$root" worktree remove --force "$tree"' EXIT
echo "A/B of benchmarks/bench_overhead.py: $old (old) vs $(git -C "$root" rev-parse --short HEAD) + working tree (new)"
echo "command: \`bash benchmarks/ab.sh $old \"$sizes\" $repeats\`"
for batch in $sizes; do
  for i in $(seq "$repeats"); do
    order=$([ $((i % 2)) = 1 ] && echo "old new" || echo "new old")
    for side in $order; do
      dir=$([ $side = old ] && echo "$tree" || echo "$root")
      echo; echo "batch $batch, run $i, $side:"; echo '```'
      (cd "$dir" && PYTHONPATH="$dir" "$root/.venv/bin/python" benchmarks/bench_overhead.py --batch-size "$batch" \
        --rounds $([ "$batch" -ge 128 ] && echo 30 || echo 60) 2>&1 | grep -v "^W")
      echo '```'
    done
  done
done
