"""SPADE: sample-targeted pruning that makes saliency maps more accurate.

Soltani Moakhar, Iofinova, Frantar & Alistarh (ICML 2024), "SPADE: Sparsity-Guided Debugging for
Deep Neural Networks". For one input, a copy of the network is pruned layer-wise (OBC-style
reconstruction) on augmentations of the input, keeping the connections that input uses; saliency
maps computed on that trace are compared with the same maps on the original network::

    from prunescope.spade import explain, write_report
    explanation = explain(model, image)              # image [C, H, W]; model untouched
    explanation.maps["integrated_gradients"]["spade"]  # the input's shape
    write_report(explanation, "runs/explain")        # PNGs + index.html
"""

from prunescope.spade.augment import Augmentations
from prunescope.spade.report import write_report
from prunescope.spade.saliency import SALIENCY, localisation_auc, saliency_map
from prunescope.spade.trace import (
    DEFAULT_METHODS,
    Explanation,
    SpadeConfig,
    check_input,
    explain,
    trace,
)

__all__ = [
    "DEFAULT_METHODS",
    "SALIENCY",
    "Augmentations",
    "Explanation",
    "SpadeConfig",
    "check_input",
    "explain",
    "localisation_auc",
    "saliency_map",
    "trace",
    "write_report",
]
