#!/usr/bin/env bash
# Run recipe-dist on N processes of this machine: launch/local.sh N <command> [args...]
#   launch/local.sh 2 purify --config configs/tiny-bert.yaml --output_dir runs/x
# Backend: gloo on CPU, nccl on GPU (chosen in recipe_dist.distributed). All hyperparameters
# live in the YAML config and its --section.key overrides, never here.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC <recipe-dist command> [args...]" >&2
  exit 2
fi
nproc="$1"; shift
# recipe_dist.launch is torchrun --standalone (a free rendezvous port, so several local jobs can
# run side by side) called as a library, ending a failed run with one line instead of torchrun's
# ChildFailedError traceback. Each rank dies with it (PR_SET_PDEATHSIG), so kill -9 of this
# process leaves no orphan behind.
# OMP_NUM_THREADS: torchrun sets 1 when unset; keep the caller's value, else share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
py="${RECIPE_DIST_PYTHON:-python}"
echo "launch: torchrun --standalone --nproc_per_node=$nproc -m recipe_dist $* (OMP_NUM_THREADS=$OMP_NUM_THREADS)" >&2
exec "$py" -m recipe_dist.launch "$nproc" "$@"
