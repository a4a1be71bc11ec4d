"""Stage: topology -> the host networking plan that original_src needs (`keepsrc netplan`)."""

from keepsrc.netplan.apply import ApplyError, apply, remove
from keepsrc.netplan.check import host_findings
from keepsrc.netplan.plan import NetPlan, PlanError, plan_for, render

__all__ = ["ApplyError", "NetPlan", "PlanError", "apply", "host_findings", "plan_for", "remove", "render"]
