#!/usr/bin/env bash
# Pretrain across several machines with torchrun's c10d rendezvous. Run the same command on
# every node:
#   NNODES=4 MASTER_ADDR=node0 scripts/launch_multi_node.sh configs/pretrain.yaml runs/pretrain
# MASTER_ADDR must be reachable from all nodes; RDZV_ID must be the same on all of them.
set -euo pipefail
config=${1:?usage: $0 CONFIG OUTPUT_DIR [overrides...]}
out=${2:?usage: $0 CONFIG OUTPUT_DIR [overrides...]}
shift 2
: "${NNODES:?set NNODES to the number of machines}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
# torchrun forwards SIGTERM to the ranks and SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds (torch >= 2.12; default 30, older torchrun: a fixed 30): leave time for a full checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
exec torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="${NPROC:-8}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-albef}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  -m albef.pretrain --config "$config" --output-dir "$out" --resume auto "$@"
