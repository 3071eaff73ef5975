#!/usr/bin/env bash
# Single node:  launch/torchrun.sh 4 tiny train.steps=100
# Multi node:   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 8 llama-1b
# (run the same line on every node with its own NODE_RANK)
set -euo pipefail
NPROC=${1:?usage: torchrun.sh PROCS_PER_NODE CONFIG [overrides...]}; shift
CMD=(torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
     -m megalite train "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
