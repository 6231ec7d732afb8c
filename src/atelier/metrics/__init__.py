"""Evaluation: FID (Heusel et al. 2017), KID (Bińkowski et al. 2018) and IS (Salimans et al. 2016) through
torchmetrics, improved precision and recall (Kynkäänniemi et al. 2019, :mod:`.precision_recall`, through
torch-fidelity), with a pinned protocol (:mod:`.protocol`), feature extractors (:mod:`.inception`,
:mod:`.mnist_features`, :mod:`.art_features`), a reference-statistics cache (:mod:`.cache`) and one evaluation loop
(:mod:`.evaluator`).
"""

from atelier.metrics.evaluator import Evaluator
from atelier.metrics.protocol import EvalProtocol, to_uint8
from atelier.metrics.suite import GenerativeMetrics, build_extractor

__all__ = ["EvalProtocol", "Evaluator", "GenerativeMetrics", "build_extractor", "to_uint8"]
