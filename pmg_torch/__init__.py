"""pmg-torch: the geometry of a classifier's perceptual manifolds, measured in PyTorch while it trains.

A perceptual manifold is the point cloud of one class's embeddings, ``(m, D)``. The metrics here take such a
cloud as a tensor on any device; :class:`EmbeddingCapture` collects the clouds from a model with a forward hook,
and :func:`analyze` computes every metric per class.
"""

from ._validation import DegenerateInputWarning
from .neighbours import Neighbourhoods, knn, neighbourhoods, remove_duplicate_rows

__version__ = "0.1.0"

__all__ = [
    "DegenerateInputWarning",
    "Neighbourhoods",
    "knn",
    "neighbourhoods",
    "remove_duplicate_rows",
]
