#!/usr/bin/env bash
# The GPU check (one script, under 8 minutes on one CUDA GPU): what CPUs cannot show.
#   1. the Triton kernel tests, compiled (TRITON_INTERPRET unset), against the PyTorch reference;
#   2. `recipe-dist bench step` in bf16 on a BERT-base-sized random encoder: samples/s against the
#      reference loop and useful-FLOP utilisation (MFU) against the GPU's measured bf16 GEMM peak;
#   3. a 1-GPU purify of the tiny config through DeepSpeed (NCCL) in bf16.
# Results go to $OUT (default ./gpu-check-out): kernels.txt, step.json, purify/summary.json, gpu-check.json.
#   launch/gpu-check.sh            run it
#   launch/gpu-check.sh --dry-run  print the plan and exit (works without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
PY="${PYTHON:-python}"
steps=(
  "kernels|env -u TRITON_INTERPRET RECIPE_DIST_TEST_DEVICE=cuda $PY -m pytest -q tests/test_kernels.py -k 'triton or bf16 or activation' -p no:cacheprovider"
  "step|$PY -m recipe_dist bench step --preset bert-base --device cuda --precision bf16 --json $OUT/step.json"
  "purify|$PY -m recipe_dist purify --config configs/tiny-bert.yaml --output_dir $OUT/purify --overwrite=true --train.precision=bf16 --train.max_steps=60"
)
if [ "${1:-}" = "--dry-run" ]; then
  echo "gpu-check plan (results in $OUT):"
  for s in "${steps[@]}"; do echo "  ${s%%|*}: ${s#*|}"; done
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device visible to torch (use --dry-run to see the plan)" >&2
  exit 2
fi
mkdir -p "$OUT"
declare -A took status
for s in "${steps[@]}"; do
  name="${s%%|*}"; cmd="${s#*|}"
  echo "== $name: $cmd"
  t0=$(date +%s)
  if bash -c "$cmd" > >(tee "$OUT/$name.txt") 2>&1; then status[$name]=ok; else status[$name]=failed; fi
  took[$name]=$(( $(date +%s) - t0 ))
done
"$PY" - "$OUT" "${status[kernels]}" "${status[step]}" "${status[purify]}" "${took[kernels]}" "${took[step]}" "${took[purify]}" <<'PYEOF'
import json, sys, torch
out, *rest = sys.argv[1:]
names = ["kernels", "step", "purify"]
result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "status": dict(zip(names, rest[:3])), "seconds": dict(zip(names, map(int, rest[3:])))}
try:
    step = json.load(open(f"{out}/step.json"))
    result["step"] = {k: step[k] for k in ("samples_per_s", "speedup_vs_reference", "useful_flop_utilization", "gemm_peak_flops", "precision")}
except (OSError, KeyError, ValueError):
    pass
json.dump(result, open(f"{out}/gpu-check.json", "w"), indent=2)
print(json.dumps(result, indent=2))
PYEOF
[ "${status[kernels]}${status[step]}${status[purify]}" = "okokok" ]
