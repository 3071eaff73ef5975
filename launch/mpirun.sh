#!/usr/bin/env bash
# megalite under mpirun (Open MPI; MPICH/Intel MPI work the same way with their own flags).
# Each rank reads OMPI_COMM_WORLD_* (or PMI_*) in megalite.distributed.launcher.discover.
#
# Single node, N ranks (rendezvous on localhost; MASTER_PORT picks the port, default 29500):
#   launch/mpirun.sh 4 tiny parallel.tp=2
# Multi node: HOSTFILE lists the hosts ("node1 slots=8" per line, Open MPI syntax). Rank 0's
# host and a free port are broadcast with mpi4py (pip install mpi4py), or export MASTER_ADDR
# and MASTER_PORT yourself; they are forwarded to every rank with -x.
#   HOSTFILE=hosts launch/mpirun.sh 16 llama-1b parallel.tp=8
# As root (containers) set MPI_ROOT_OK=1 (adds --allow-run-as-root); with more ranks than
# cores (CPU tests) set OVERSUBSCRIBE=1.
set -euo pipefail
N=${1:?usage: mpirun.sh TOTAL_RANKS CONFIG [overrides...]}; shift
CMD=(mpirun -np "$N" --bind-to none --map-by slot)
[[ -n "${HOSTFILE:-}" ]] && CMD+=(--hostfile "$HOSTFILE")
[[ -n "${MPI_ROOT_OK:-}" ]] && CMD+=(--allow-run-as-root)
[[ -n "${OVERSUBSCRIBE:-}" ]] && CMD+=(--oversubscribe)
for var in PATH LD_LIBRARY_PATH VIRTUAL_ENV MASTER_ADDR MASTER_PORT OMP_NUM_THREADS NCCL_DEBUG; do
    [[ -n "${!var:-}" ]] && CMD+=(-x "$var")
done
CMD+=(python -m megalite train "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
