#!/usr/bin/env bash
# megalite under the deepspeed launcher (engine.backend=deepspeed is not implied: pass it, or set it in CONFIG).
#
# Single node, N processes:
#   launch/deepspeed.sh 8 llama-1b engine.backend=deepspeed engine.zero_stage=2
# Multi node, from ONE node (deepspeed ssh-es to every host of the hostfile; passwordless ssh and the same
# checkout/venv path on every host are needed; see launch/hostfile.example):
#   HOSTFILE=launch/hostfile launch/deepspeed.sh - llama-7b engine.backend=deepspeed engine.zero_stage=1 parallel.tp=8
#   ("-" as the count means: the slots of every host in the hostfile)
# Multi node without ssh: run the same line on every node with its own NODE_RANK (the host's line in the
# hostfile, from 0) and MASTER_ADDR = the first host; deepspeed then starts only that node's slots:
#   NODE_RANK=1 MASTER_ADDR=node1 HOSTFILE=launch/hostfile launch/deepspeed.sh - llama-7b engine.backend=deepspeed
# A hostfile with a single host is launched locally (no ssh, so deepspeed's ssh check is skipped).
# On a CPU machine (tests, demos) export DS_ACCELERATOR=cpu: the launcher then starts N CPU processes
# with --num_gpus N, and megalite runs on gloo.
#
# The launcher exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which megalite reads
# (megalite/distributed/launcher.py), and passes --local_rank=N, which `megalite` accepts and ignores.
set -euo pipefail
N=${1:?usage: deepspeed.sh PROCS_PER_NODE|- CONFIG [overrides...]}; shift
CMD=(deepspeed --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
    CMD+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$(hostname)}")
    HOSTS=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" || true)
    if [[ -n "${NODE_RANK:-}" ]]; then
        CMD+=(--no_ssh --node_rank "$NODE_RANK")
    elif [[ "$HOSTS" == 1 ]]; then
        CMD+=(--no_ssh_check)  # one host: deepspeed launches it locally, ssh is never used
    fi
    [[ "$N" != "-" ]] && CMD+=(--num_gpus "$N")
else
    [[ "$N" == "-" ]] && { echo "deepspeed.sh: '-' needs HOSTFILE=..." >&2; exit 2; }
    CMD+=(--num_gpus "$N")
fi
CMD+=(--module megalite train "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
