"""pmg-torch: the geometry of a classifier's perceptual manifolds, measured in PyTorch while it trains.

A perceptual manifold is the point cloud of one class's embeddings, ``(m, D)``. The metrics here take such a
cloud as a tensor on any device; :class:`EmbeddingCapture` collects the clouds from a model with a forward hook,
and :func:`analyze` computes every metric per class.
"""

from ._validation import DegenerateInputWarning
from .accuracy import AccuracyCapture, ClassAccuracy, accuracy_scalars, spearman_correlation
from .analysis import AVAILABLE_METRICS, DEFAULT_METRICS, ManifoldReport, analyze
from .capture import EmbeddingCapture
from .compat import (
    calculate_volume,
    estimate_holes_ripser,
    estimate_intrinsic_dimension,
    estimate_nonconvexity,
    quantify_overall_concavity,
)
from .convexity import gaussian_projections, nonconvexity, nonconvexity_from_projections
from .curvature import CurvatureResult, curvature, curvature_from_neighbourhoods
from .dimension import intrinsic_dimension, intrinsic_dimension_from_neighbourhoods, participation_ratio
from .neighbours import Neighbourhoods, knn, neighbourhoods, remove_duplicate_rows
from .shape import shape_similarity, shape_similarity_matrix
from .tensorboard import write_report
from .topology import HolesResult, holes
from .volume import VolumeResult, volume

__version__ = "0.1.0"

__all__ = [
    "AVAILABLE_METRICS",
    "AccuracyCapture",
    "ClassAccuracy",
    "CurvatureResult",
    "DEFAULT_METRICS",
    "DegenerateInputWarning",
    "EmbeddingCapture",
    "HolesResult",
    "ManifoldReport",
    "Neighbourhoods",
    "VolumeResult",
    "accuracy_scalars",
    "analyze",
    "calculate_volume",
    "curvature",
    "curvature_from_neighbourhoods",
    "estimate_holes_ripser",
    "estimate_intrinsic_dimension",
    "estimate_nonconvexity",
    "gaussian_projections",
    "holes",
    "intrinsic_dimension",
    "intrinsic_dimension_from_neighbourhoods",
    "knn",
    "neighbourhoods",
    "nonconvexity",
    "nonconvexity_from_projections",
    "participation_ratio",
    "quantify_overall_concavity",
    "remove_duplicate_rows",
    "shape_similarity",
    "shape_similarity_matrix",
    "spearman_correlation",
    "volume",
    "write_report",
]
