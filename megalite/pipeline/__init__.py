"""Pipeline parallelism: partitioning, point-to-point transfer, schedules as action lists, the executor."""
from megalite.pipeline.executor import Executor, RunStats, StageHooks
from megalite.pipeline.p2p import P2P
from megalite.pipeline.partition import (StageModel, build_stage_model, partition_balanced, partition_blocks,
                                         partition_uniform, tie_embedding_grads)
from megalite.pipeline.runner import PipelineRunner
from megalite.pipeline.deadlock import check_schedule
from megalite.pipeline.schedules import (Action, Step, all_schedules, build_schedule, comm_steps, max_in_flight,
                                        schedule_steps, simulate)

__all__ = ["Action", "Executor", "P2P", "PipelineRunner", "RunStats", "StageHooks", "StageModel", "Step",
           "all_schedules", "build_schedule", "build_stage_model", "check_schedule", "comm_steps",
           "max_in_flight", "partition_balanced", "partition_blocks", "partition_uniform", "schedule_steps",
           "simulate", "tie_embedding_grads"]
