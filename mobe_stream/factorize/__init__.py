"""MoBE factorization: pure tensor code (no file I/O), device-agnostic."""

from .adam import AdamSolver
from .als import AlternatingSolver
from .baselines import METHODS, LowRankFactors, MethodPlan, factors_from_tensors, fit_baseline, fit_lowrank, plan_method
from .init import INITS, init_fitted, init_grouped_svd, init_scaled, initial_factors
from .lstsq import solve_A
from .metric import InputMetric, expert_metrics, random_metric
from .metrics import choose_bases_rank, expert_cut, param_fraction, relative_error, working_set_bytes
from .model import ACTIVATIONS, MoBEFactors, MoBESpec, mixed_bases, prepare_targets
from .precision import PRECISIONS, Precision
from .schedule import SCHEDULES
from .shard import ExpertShard, expert_bounds
from .storage import refit_for_storage
from .targets import Targets, zscored

__all__ = ["METHODS", "SCHEDULES", "LowRankFactors", "MethodPlan", "factors_from_tensors", "fit_baseline", "fit_lowrank",
           "plan_method", "InputMetric", "expert_metrics", "random_metric",
           "AdamSolver", "AlternatingSolver", "solve_A", "INITS", "init_fitted", "init_scaled", "initial_factors",
           "init_grouped_svd", "choose_bases_rank", "expert_cut",
           "param_fraction", "relative_error", "working_set_bytes", "ACTIVATIONS", "MoBEFactors", "MoBESpec",
           "mixed_bases", "prepare_targets", "refit_for_storage", "PRECISIONS", "Precision", "ExpertShard", "expert_bounds",
           "Targets", "zscored"]
