"""Rank layout (pure math), the ProcessGroups object and launcher discovery.

    topo = Topology.from_world(world_size, tp=2, pp=2)     # validated, frozen
    env = discover(); init_distributed(env)                 # any launcher
    groups = ProcessGroups.build(topo)                      # once; hand it around
"""
from megalite.topology.grid import GROUP_KINDS, ORDERS, Coords, Topology, parse_order
from megalite.topology.groups import ProcessGroups
from megalite.topology.launcher import LaunchEnv, LaunchError, discover, expand_nodelist, init_distributed

__all__ = ["Coords", "GROUP_KINDS", "LaunchEnv", "LaunchError", "ORDERS", "ProcessGroups", "Topology",
           "discover", "expand_nodelist", "init_distributed", "parse_order"]
