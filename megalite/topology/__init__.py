"""The rank grid (pure math) and the ProcessGroups object built from it.

    topo = Topology.from_world(world_size, tp=2, pp=2)     # validated, frozen
    groups = ProcessGroups.build(topo)                      # once (after init_distributed); hand it around

Launcher discovery and failure handling are megalite.distributed's.
"""
from megalite.topology.grid import GROUP_KINDS, ORDERS, Coords, Topology, parse_order
from megalite.topology.groups import ProcessGroups

__all__ = ["Coords", "GROUP_KINDS", "ORDERS", "ProcessGroups", "Topology", "parse_order"]
