"""Memory plans: ``model.memory=auto`` and ``python -m melrecon.plan`` (planner.py: candidates,
scores, the choice; time_model.py: relative step time; config.py: Hydra configs in and out)."""

from melrecon.plan.planner import NetworkSpec, Plan, PlanTable, candidates, plan_table, score

__all__ = ["NetworkSpec", "Plan", "PlanTable", "candidates", "plan_table", "score"]
