"""Function-space measures of many replicas at once: prediction disagreement and the
generalization-disagreement estimate, soft divergences, weakness and simplicity.

Entry point: :func:`function_measures` (exported as ``fastcurv.function_measures``).
"""
from .api import DEFAULT_MEASURES, MEASURES, FunctionMeasuresResult, function_measures
from .predictions import Predictions, collect_predictions, label_dtype

__all__ = [
    "DEFAULT_MEASURES",
    "MEASURES",
    "FunctionMeasuresResult",
    "Predictions",
    "collect_predictions",
    "function_measures",
    "label_dtype",
]
