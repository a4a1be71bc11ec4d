"""Stage: topology -> the host networking plan that original_src needs (`keepsrc netplan`)."""

from keepsrc.netplan.apply import ApplyError, apply, remove
from keepsrc.netplan.plan import NetPlan, PlanError, plan_for, render

__all__ = ["ApplyError", "NetPlan", "PlanError", "apply", "plan_for", "remove", "render"]
