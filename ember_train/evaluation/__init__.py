"""Evaluation: MTEB-protocol evaluators that run offline on local files, plus their metrics.

Every evaluator maps an encoder to an :class:`EvalResult` whose metrics use MTEB's ×100 convention.
Task descriptors (:func:`load_task`) build evaluators from small YAML/JSON files.
"""

from ember_train.evaluation.base import EvalResult, Evaluator
from ember_train.evaluation.classification import ClassificationEvaluator
from ember_train.evaluation.clustering import ClusteringEvaluator
from ember_train.evaluation.pair_classification import PairClassificationEvaluator
from ember_train.evaluation.reranking import RerankingEvaluator
from ember_train.evaluation.retrieval import RetrievalEvaluator
from ember_train.evaluation.sts import STSEvaluator
from ember_train.evaluation.tasks import load_task, load_tasks

__all__ = [
    "ClassificationEvaluator",
    "ClusteringEvaluator",
    "EvalResult",
    "Evaluator",
    "PairClassificationEvaluator",
    "RerankingEvaluator",
    "RetrievalEvaluator",
    "STSEvaluator",
    "load_task",
    "load_tasks",
]
