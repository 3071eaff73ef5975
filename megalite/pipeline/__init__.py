"""Pipeline parallelism: partitioning, point-to-point transfer, schedules as action lists, the executor,
and the runner the trainer drives for every layout (pp=1 is the one-stage pipeline)."""
from megalite.pipeline.deadlock import check_schedule
from megalite.pipeline.executor import Executor, RunStats, StageHooks
from megalite.pipeline.p2p import P2P
from megalite.pipeline.partition import (
    build_stage_model,
    partition_balanced,
    partition_blocks,
    partition_uniform,
    rank_chunks,
    tie_embedding_grads,
)
from megalite.pipeline.runner import PipelineRunner, schedule_kind
from megalite.pipeline.schedules import (
    Action,
    Step,
    all_schedules,
    build_schedule,
    comm_steps,
    max_in_flight,
    schedule_steps,
    simulate,
)

__all__ = ["Action", "Executor", "P2P", "PipelineRunner", "RunStats", "StageHooks", "Step", "all_schedules",
           "build_schedule", "build_stage_model", "check_schedule", "comm_steps", "max_in_flight",
           "partition_balanced", "partition_blocks", "partition_uniform", "rank_chunks", "schedule_kind",
           "schedule_steps", "simulate", "tie_embedding_grads"]
