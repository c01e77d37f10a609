"""Sparsity calibration and quality measurement.

* :mod:`.data` reads calibration text and cuts it into token windows;
* :mod:`.histogram` keeps streaming log-spaced histograms of scores;
* :mod:`.collect` hooks the projections and fills the histograms;
* :mod:`.allocate` gives each projection its sparsity (uniform or greedy);
* :mod:`.calibrate` turns that into a :class:`~steerkern.plan.SparsityPlan`;
* :mod:`.quality` measures perplexity / embedding cosine against sparsity.
"""
from .calibrate import Calibrator, apply_plan, average, measure, projection_sites, site_weights
from .data import default_text_path, read_text, split_windows, token_windows

__all__ = [
    "Calibrator", "calibrate", "apply_plan", "average", "measure", "projection_sites", "site_weights",
    "default_text_path", "read_text", "split_windows", "token_windows",
]


def calibrate(model, windows, sparsity: float, *, mode: str = "wina", allocation: str = "uniform",
              steering=None, batch_size: int = 8, greedy_windows: int = 8, step: float = 0.05,
              refine: int = 1, progress: bool = True, model_name=None):
    """One-call calibration: a SparsityPlan reaching ``sparsity`` on ``windows``."""
    cal = Calibrator(model, windows, steering=steering, batch_size=batch_size,
                     greedy_windows=greedy_windows if allocation == "greedy" else 0, progress=progress)
    return cal.plan(sparsity, mode=mode, allocation=allocation, step=step, refine=refine,
                    model_name=model_name)
