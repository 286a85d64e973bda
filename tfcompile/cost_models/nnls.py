"""Non-negative least squares for calibration's fit: SciPy's where SciPy is installed, else numpy's own.

A GPU machine may have no SciPy; ``nnls_numpy`` is Lawson and Hanson's
active-set method, returning what ``scipy.optimize.nnls`` returns.
"""

from __future__ import annotations

import numpy as np


def nnls_numpy(a: np.ndarray, b: np.ndarray, max_iterations: int | None = None) -> tuple[np.ndarray, float]:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method), as
    ``scipy.optimize.nnls`` returns it: (x, residual norm). Numpy only, for machines without SciPy."""
    rows, cols = a.shape
    x = np.zeros(cols)
    passive = np.zeros(cols, dtype=bool)
    tolerance = 10 * max(rows, cols) * np.finfo(float).eps * max(1.0, float(np.abs(a).max(initial=0.0)))
    for _ in range(max_iterations or 3 * cols):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= tolerance:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, gradient)))] = True
        while True:  # solve on the passive set; step back while that leaves it infeasible
            trial = np.zeros(cols)
            trial[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if trial[passive].min() > 0:
                x = trial
                break
            shrinking = passive & (trial <= 0)
            step = np.min(x[shrinking] / (x[shrinking] - trial[shrinking]))
            x = x + step * (trial - x)
            passive &= x > tolerance
            x[~passive] = 0.0
            if not passive.any():
                break
    return x, float(np.linalg.norm(a @ x - b))


def nnls(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """SciPy's NNLS where SciPy is installed (imported here, not at import), else ``nnls_numpy``."""
    try:
        from scipy.optimize import nnls as scipy_nnls
    except ImportError:
        return nnls_numpy(a, b)
    return scipy_nnls(a, b)
