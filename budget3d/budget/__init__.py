"""The Gaussian budget: parse it, schedule it, and reach it exactly (Taming 3DGS scores, or 3DGS-MCMC)."""

from budget3d.budget.mcmc import BudgetMCMCStrategy, compute_relocation
from budget3d.budget.schedule import (
    budget_schedule,
    max_gaussians_for_size,
    parse_budget,
    ply_bytes_per_gaussian,
    ply_header_bytes,
    ply_size,
)
from budget3d.budget.taming import (
    TamingConfig,
    TamingStrategy,
    compute_scores,
    pixel_importance,
    sample_without_replacement,
)

__all__ = [
    "BudgetMCMCStrategy", "TamingConfig", "TamingStrategy", "budget_schedule", "compute_relocation",
    "compute_scores", "max_gaussians_for_size",
    "parse_budget", "pixel_importance", "ply_bytes_per_gaussian", "ply_header_bytes", "ply_size",
    "sample_without_replacement",
]
