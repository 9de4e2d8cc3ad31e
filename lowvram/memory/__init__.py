"""Memory planning: profile one exact training step on the meta device, bound it, plan the knobs.

``profile_step`` measures a plan, ``lower_bound`` says what no plan can beat, ``plan`` picks the fastest
plan that fits a card, ``profile_command`` is ``lowvram profile``.
"""

from .bound import LowerBound, lower_bound
from .planner import Plan, baseline, candidates, plan
from .profiler import MemoryProfile, card_budget, profile_step
from .report import check_preset_profile, profile_command, update_preset_profile
from .run_plan import knobs_from_config
from .workloads import WORKLOADS, Knobs, Workload, get_workload

__all__ = [
    "WORKLOADS",
    "Knobs",
    "LowerBound",
    "MemoryProfile",
    "Plan",
    "Workload",
    "baseline",
    "candidates",
    "card_budget",
    "check_preset_profile",
    "get_workload",
    "knobs_from_config",
    "lower_bound",
    "plan",
    "profile_command",
    "profile_step",
    "update_preset_profile",
]
