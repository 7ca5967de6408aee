#!/usr/bin/env bash
# Pretrain on all GPUs of one machine.
#   scripts/launch_single_node.sh configs/pretrain.yaml runs/pretrain [key.sub=value ...]
# NPROC (default: number of visible GPUs) sets the processes per node.
set -euo pipefail
config=${1:?usage: $0 CONFIG OUTPUT_DIR [overrides...]}
out=${2:?usage: $0 CONFIG OUTPUT_DIR [overrides...]}
shift 2
nproc=${NPROC:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$nproc" -ge 1 ] || nproc=1
# torchrun forwards SIGTERM to the ranks and SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds (torch >= 2.12; default 30, older torchrun: a fixed 30): leave time for a full checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
exec torchrun --standalone --nproc_per_node="$nproc" -m albef.pretrain \
  --config "$config" --output-dir "$out" --resume auto "$@"
