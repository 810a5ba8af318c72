"""Lightning callbacks that log the geometry of a classifier's perceptual manifolds while it trains."""

from .manifold_geometry import ManifoldGeometryCallback, gather_class_rows

__all__ = ["ManifoldGeometryCallback", "gather_class_rows"]
