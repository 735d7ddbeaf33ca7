"""K-means palettization (a look-up table per tensor or per group of output channels) with
coremltools' semantics: ``palettize_weights`` with mode "kmeans".

Each group's weights are clustered in one dimension into 2**bits centroids; the stored tensor
is the centroid table (in the weight's dtype) plus a ``bits``-bit index per weight. coremltools
runs scikit-learn's KMeans(n_clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0) on
the flattened group (its ``_get_kmeans_lookup_table_and_weight``), except that it switches to the
optional ``kmeans1d`` package for fp16 groups of >= 10,000 weights when that package is
installed. We run the scikit-learn path, the one coremltools takes when kmeans1d is absent.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from labkit.core import env


@functools.cache
def _kmeans_class() -> Any:
    """scikit-learn's KMeans (heavy: imported only when palettizing), after ``env.openmp_guard``.

    scikit-learn bundles its own libomp on macOS, beside torch's: the second runtime to
    initialise aborts the process unless the guard ran before the import. Once per process: a
    model's palettization calls :func:`kmeans_lut` once per group.
    """
    env.openmp_guard()
    from sklearn.cluster import KMeans

    return KMeans


def kmeans_lut(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lut (2**bits,) in values' dtype, indices uint8 like values.ravel()) for one group."""
    KMeans = _kmeans_class()
    flat = values.reshape(-1, 1)
    lut_len = 2**bits
    n_clusters = min(flat.shape[0], lut_len)
    km = KMeans(n_clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(flat)
    lut = np.zeros(lut_len)
    lut[:n_clusters] = km.cluster_centers_[:, 0]
    return lut.astype(values.dtype), km.labels_.astype(np.uint8)


def palettize(
    w: np.ndarray, bits: int, group_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(luts (n_groups, 2**bits), indices (rows, cols)) for a 2-D weight (out, in).

    ``group_rows=None`` is one LUT for the tensor (granularity "per_tensor"); otherwise each run
    of ``group_rows`` output channels shares one (granularity "per_grouped_channel").
    """
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D weight (out, in), got shape {w.shape}")
    if bits not in (1, 2, 3, 4, 6, 8):
        raise ValueError(f"bits must be one of 1, 2, 3, 4, 6, 8 (coremltools), got {bits}")
    rows = w.shape[0]
    group = rows if group_rows is None else group_rows
    if group <= 0 or rows % group:
        raise ValueError(f"group_rows={group_rows} must divide the number of rows {rows}")
    luts, indices = [], []
    for start in range(0, rows, group):
        lut, idx = kmeans_lut(w[start : start + group], bits)
        luts.append(lut)
        indices.append(idx.reshape(group, -1))
    return np.stack(luts), np.concatenate(indices)


def depalettize(luts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """lut[index] per group of rows (Core ML's constexpr_lut_to_dense)."""
    rows = indices.shape[0]
    group = rows // luts.shape[0]
    out = np.empty(indices.shape, luts.dtype)
    for g in range(luts.shape[0]):
        out[g * group : (g + 1) * group] = luts[g][indices[g * group : (g + 1) * group]]
    return out
