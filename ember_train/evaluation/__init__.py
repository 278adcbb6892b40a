"""Evaluation: MTEB-protocol evaluators that run offline on local files, plus their metrics.

Every evaluator maps an encoder to an :class:`EvalResult` whose metrics use MTEB's ×100 convention.
"""

from ember_train.evaluation.base import EvalResult, Evaluator
from ember_train.evaluation.retrieval import RetrievalEvaluator

__all__ = ["EvalResult", "Evaluator", "RetrievalEvaluator"]
