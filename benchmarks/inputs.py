"""Seeded synthetic point clouds with a known geometry, shared by the benchmark sections."""

from __future__ import annotations

import numpy as np


def linear_embedding(n: int, intrinsic_dim: int, ambient_dim: int, *, noise: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Return ``(n, ambient_dim)`` float64 points: a standard Gaussian in ``intrinsic_dim`` dimensions, mapped by a
    random orthonormal frame into ``ambient_dim`` dimensions, plus isotropic Gaussian noise of scale ``noise``.

    Its intrinsic dimension is ``intrinsic_dim`` at scales well above ``noise``.
    """
    rng = np.random.default_rng(seed)
    frame, _ = np.linalg.qr(rng.standard_normal((ambient_dim, intrinsic_dim)))
    latent = rng.standard_normal((n, intrinsic_dim))
    return latent @ frame.T + noise * rng.standard_normal((n, ambient_dim))


def noisy_circle(n: int, ambient_dim: int, *, radius: float = 1.0, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    """Return ``(n, ambient_dim)`` float64 points on a circle in a random 2-plane, plus noise: one H1 bar of
    persistence close to ``radius * sqrt(3)`` and short noise bars."""
    rng = np.random.default_rng(seed)
    frame, _ = np.linalg.qr(rng.standard_normal((ambient_dim, 2)))
    angles = rng.uniform(0.0, 2.0 * np.pi, n)
    plane = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return plane @ frame.T + noise * rng.standard_normal((n, ambient_dim))


def wide_gaussian(n: int, ambient_dim: int, *, scale: float = 2.0, seed: int = 0) -> np.ndarray:
    """Return ``(n, ambient_dim)`` float64 isotropic Gaussian points of standard deviation ``scale``.

    At ``ambient_dim = 512`` and ``scale = 2`` the eigenvalues of ``I + Z_c^T Z_c / n`` are near 5, so their product
    (about 5**512) overflows float64 and ``det`` returns inf.
    """
    return scale * np.random.default_rng(seed).standard_normal((n, ambient_dim))


def class_clouds(n_classes: int, per_class: int, ambient_dim: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 embeddings ``(n_classes * per_class, ambient_dim)`` and int64 labels for a curved manifold per
    class: ``tanh`` of a random linear map of a 16-dimensional Gaussian, shifted by a class mean, plus noise."""
    rng = np.random.default_rng(seed)
    clouds = []
    for _ in range(n_classes):
        latent = rng.standard_normal((per_class, 16))
        lift = rng.standard_normal((16, ambient_dim)) / 4.0
        centre = rng.standard_normal(ambient_dim)
        clouds.append(np.tanh(latent @ lift) + centre + 0.01 * rng.standard_normal((per_class, ambient_dim)))
    labels = np.repeat(np.arange(n_classes), per_class)
    return np.concatenate(clouds).astype(np.float32), labels
