"""Pipeline parallelism: partitioning, point-to-point transfer, schedules as action lists, the executor."""
from megalite.pipeline.executor import Executor, RunStats, StageHooks
from megalite.pipeline.p2p import P2P
from megalite.pipeline.partition import (StageModel, build_stage_model, partition_balanced, partition_blocks,
                                         partition_uniform, tie_embedding_grads)
from megalite.pipeline.runner import PipelineRunner
from megalite.pipeline.schedules import Action, all_schedules, build_schedule, max_in_flight, simulate

__all__ = ["Action", "Executor", "P2P", "PipelineRunner", "RunStats", "StageHooks", "StageModel",
           "all_schedules", "build_schedule", "build_stage_model", "max_in_flight", "partition_balanced",
           "partition_blocks", "partition_uniform", "simulate", "tie_embedding_grads"]
