"""The distributed runtime: who started us (launcher discovery), how a failing rank ends the job
(failure handling, stop signals, planned faults for tests), and what crossed the wire
(communication accounting). The rank grid and its process groups live in megalite.topology."""
from megalite.distributed.launcher import (
    LaunchEnv,
    LaunchError,
    device_index,
    discover,
    expand_nodelist,
    free_port,
    init_distributed,
)

__all__ = ["LaunchEnv", "LaunchError", "device_index", "discover", "expand_nodelist", "free_port", "init_distributed"]
