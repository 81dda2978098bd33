#!/usr/bin/env bash
# Runs the CPU-sized paper-claim experiments one after another (each resumes where it stopped).
set -u
cd "$(dirname "$0")/.."
for e in "$@"; do
  echo "=== $e $(date -Is)"
  .venv/bin/python "experiments/$e.py" || echo "=== $e FAILED"
done
echo "=== all done $(date -Is)"
