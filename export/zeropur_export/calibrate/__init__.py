"""Per-victim calibration of ZeroPur: fit the recipe to a classifier, training-free.

    from zeropur_export.calibrate import calibrate, evaluate_configs, Grid
    res = calibrate(victim, x, y, max_clean_drop=3.0)     # x: NCHW float in [0, 1]; y: int labels
    res.config                                            # the chosen ZeroPurConfig, or None
    res.report                                            # every config tried, the chosen one, the references
    res.save("runs/calib")                                # report.json / .md / .png, calibrated_config.json

Modules: ``api`` (the two entry points), ``search`` (the grid and the successive-halving search),
``evaluator`` (purified accuracy with shared Guided Shift and incremental rows), ``attack`` (PGD, cached),
``report`` (tables, plot, files), ``inputs`` and ``cli`` (the command ``zeropur-export calibrate``).
"""
from __future__ import annotations

from .api import CalibrationResult, EvaluationResult, calibrate, check_settings, evaluate_configs
from .common import EXIT_BAD_INPUT, EXIT_NO_FEASIBLE, CalibError, cfg_key, cfg_label
from .scorer import ConfigScorer, Record
from .search import Grid

__all__ = ["CalibError", "CalibrationResult", "EXIT_BAD_INPUT", "EXIT_NO_FEASIBLE", "EvaluationResult", "ConfigScorer",
           "Grid", "Record", "calibrate", "cfg_key", "cfg_label", "check_settings", "evaluate_configs"]
