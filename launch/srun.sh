#!/usr/bin/env bash
# One recipe-dist process per SLURM task: srun launch/srun.sh <recipe-dist command> [args...]
# Ranks come from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (recipe_dist.distributed); the
# sbatch templates export MASTER_ADDR and MASTER_PORT. One task per GPU (or per CPU process)
# rather than torchrun per node: SLURM then delivers its warning signal (--signal) to every rank
# directly, which torchrun's agent would not forward.
set -euo pipefail
py="${RECIPE_DIST_PYTHON:-python}"
if [ "${SLURM_PROCID:-0}" = "0" ]; then
  echo "launch: $py -m recipe_dist $* (${SLURM_NTASKS:-1} tasks on ${SLURM_JOB_NUM_NODES:-1} node(s), master ${MASTER_ADDR:-?}:${MASTER_PORT:-?})" >&2
fi
exec "$py" -m recipe_dist "$@"
