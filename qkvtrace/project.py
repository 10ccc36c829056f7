"""Projection of vectors to 2-D/3-D (PCA, UMAP, t-SNE) behind one function, frames across epochs, and the
similarity measures the study's claims are checked with (cosine, linear CKA, silhouette, neighbour purity).

Everything here takes and returns numpy arrays; sklearn and umap are imported inside the functions that need them,
because importing them costs seconds and `qkvtrace --help` must stay fast.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkvtrace.errors import QkvtraceError

log = logging.getLogger("qkvtrace")

METHODS = ("pca", "umap", "tsne")
FRAMES = ("joint", "procrustes", "aligned-umap")
# Columns that name one vector across checkpoints: the same token slot, site, layer, head and kind.
IDENTITY_COLUMNS = ("sentence_id", "side", "position", "site", "layer", "head", "kind")


def min_points(method: str, dims: int = 2) -> int:
    """The fewest points `project` accepts for `method`.

    pca: 2 points (one direction of variance). umap: max(4, dims + 2): n_neighbors = n - 1 must be at least 3 for
    the fuzzy graph to say anything, and the spectral layout (which AlignedUMAP always uses) needs n > dims + 1.
    tsne: 5 points, so that the adapted perplexity (n - 1) / 3 is above 1.
    """
    return {"pca": 2, "umap": max(4, dims + 2), "tsne": 5}[method]


def _check(X: np.ndarray, method: str, dims: int) -> np.ndarray:
    if method not in METHODS:
        raise QkvtraceError(f"unknown projection method {method!r}; choose one of: {', '.join(METHODS)}")
    X = np.asarray(X)
    if X.ndim != 2:
        raise QkvtraceError(f"expected a (n_points, dim) matrix, got shape {X.shape}")
    if dims < 1:
        raise QkvtraceError(f"dims={dims}: the projection needs at least 1 dimension (2 or 3 for plots)")
    n, dim = X.shape
    need = min_points(method, dims)
    if n < need:
        raise QkvtraceError(f"{method} needs at least {need} points; the selection has {n}: "
                            "select more sentences, kinds or epochs")
    if method == "pca" and dims > min(n, dim):
        raise QkvtraceError(f"pca to {dims} dimensions needs at least {dims} points and {dims}-wide vectors; "
                            f"the selection has {n} points of width {dim}")
    if not np.isfinite(X).all():
        raise QkvtraceError("the selected vectors contain NaN or infinite values; the checkpoint may have diverged")
    return X.astype(np.float64)


_numba_noted = False


def _import_umap():
    """Import umap with a persistent numba cache, so only the first run ever pays the ~15 s compilation."""
    global _numba_noted
    if "NUMBA_CACHE_DIR" not in os.environ:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(cache_home, "qkvtrace", "numba")
    cache = Path(os.environ["NUMBA_CACHE_DIR"])
    if not _numba_noted and not (cache.is_dir() and any(cache.iterdir())):
        log.warning("the first UMAP run compiles numba code (about 15 s); later runs reuse the cache in %s", cache)
    _numba_noted = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap's import-time deprecation chatter from numba/sklearn
        import umap
        import umap.aligned_umap
        import umap.distances
        import umap.layouts
        import umap.spectral
        import umap.umap_
        import umap.utils
    _enable_numba_caching((umap.umap_, umap.layouts, umap.distances, umap.utils, umap.spectral, umap.aligned_umap))
    if not isinstance(umap.layouts.numba, _CachedJit):
        umap.layouts.numba = _CachedJit(umap.layouts.numba)
    return umap


class _CachedJit:
    """Stands for `numba` inside umap.layouts, whose AlignedUMAP layout jits its epoch function anew on every call
    (`numba.njit(_optimize_layout_aligned_euclidean_single_epoch, ...)`): that compile took 4-6 s of every
    aligned-umap projection. Here `njit(f, **options)` is made once per process and cached on disk like the rest;
    everything else is numba's own."""

    def __init__(self, numba):
        self._numba = numba
        self._made: dict = {}

    def __getattr__(self, name):
        return getattr(self._numba, name)

    def njit(self, *args, **options):
        if len(args) != 1 or not callable(args[0]):
            return self._numba.njit(*args, **options)
        key = (args[0], tuple(sorted(options.items())))
        if key not in self._made:
            self._made[key] = self._numba.njit(args[0], cache=True, **options)
        return self._made[key]


def _enable_numba_caching(modules) -> None:
    """Turn on numba's disk cache for umap's jitted functions that were declared without cache=True.

    Without this every new process recompiles them (~10 s before the first UMAP result); with it only the first
    process ever does. `Dispatcher.enable_caching` is what `cache=True` calls; a cache that cannot be written
    (read-only home) just leaves the function uncached.
    """
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and isinstance(obj._cache, NullCache):
                try:
                    obj.enable_caching()
                except Exception:  # numba raises RuntimeError when no cache locator is usable
                    return


def _umap_init(n: int, dims: int) -> str:
    # The spectral layout's Lanczos solver wants 2 * (dims + 1) + 1 vectors; on fewer points start from PCA.
    return "spectral" if n > 2 * dims + 3 else "pca"


def unique_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of X (n, d) in order of first appearance, and for each row of X the index of its
    distinct row: `U[inverse]` equals X exactly. Shapes (n_unique, d) and (n,)."""
    X = np.ascontiguousarray(X)
    if not len(X):
        return X, np.zeros(0, dtype=np.int64)
    # Compare bytes, not floats: -0.0 and 0.0 stay apart, which errs on the side of two points.
    rows = X.view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique's sorted order -> order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return X[first[order]], rank[inverse.ravel()]


def project(X: np.ndarray, method: str = "pca", dims: int = 2, seed: int = 0) -> np.ndarray:
    """Project vectors to `dims` dimensions; exactly equal vectors get exactly equal coordinates.

    UMAP and t-SNE are fitted on the distinct rows and the result mapped back to every row (fitted on all rows,
    they would place copies of one vector apart, as distinct points). PCA is fitted on all rows, so a repeated
    vector keeps its weight in the variance, and the distinct rows are transformed and mapped back.

    Parameters
    ----------
    X : np.ndarray
        Shape (n_points, dim).
    method : {"pca", "umap", "tsne"}
        UMAP uses n_neighbors = min(15, n_points - 1), t-SNE perplexity = min(30, (n_points - 1) / 3), so small
        selections work; below `min_points(method, dims)` points a QkvtraceError says how many there are.
    dims : int
        Output dimensions, 2 or 3 for plots.
    seed : int
        Passed as random_state; the same seed gives the same coordinates. Nothing is seeded globally.

    Returns
    -------
    np.ndarray
        Shape (n_points, dims), float64.
    """
    X = _check(X, method, dims)
    U, inverse = unique_rows(X)
    if method == "pca":
        if len(U) == 1:
            # One distinct vector: every point at the origin (sklearn would divide a variance of 0 by 0 and warn).
            return np.zeros((len(X), dims))
        return pca(X, U, dims)[inverse]
    if len(U) < min_points(method, dims):
        raise QkvtraceError(f"{method} needs at least {min_points(method, dims)} distinct vectors; the selection "
                            f"has {len(X)} points but only {len(U)} distinct ones: select more sentences, kinds or "
                            "epochs, or use method pca")
    return _fit_manifold(U, method, dims, seed)[inverse]


def pca(X: np.ndarray, U: np.ndarray, dims: int) -> np.ndarray:
    """The rows U (m, d) in the first `dims` principal axes of X (n, d): sklearn's PCA(svd_solver="full") to
    rounding (the same LAPACK SVD and its sign rule: each axis's largest-magnitude entry is positive). Written
    out because figures are drawn in worker processes, and importing sklearn costs each of them 0.5 s."""
    mean = X.mean(axis=0)
    axes = np.linalg.svd(X - mean, full_matrices=False)[2][:dims]  # (dims, d)
    axes *= np.sign(axes[np.arange(dims), np.abs(axes).argmax(axis=1)])[:, None]
    return (U - mean) @ axes.T


def _fit_manifold(X: np.ndarray, method: str, dims: int, seed: int) -> np.ndarray:
    """UMAP or t-SNE of (n, d) float64 rows, all distinct -> (n, dims)."""
    n = X.shape[0]
    if method == "umap":
        umap = _import_umap()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", small-graph notes
            reducer = umap.UMAP(n_components=dims, n_neighbors=min(15, n - 1), init=_umap_init(n, dims),
                                random_state=seed, n_jobs=1)
            return np.asarray(reducer.fit_transform(X), dtype=np.float64)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (n - 1) / 3)
    tsne = TSNE(n_components=dims, perplexity=perplexity, init="pca", random_state=seed,
                method="barnes_hut" if dims < 4 else "exact")
    return np.asarray(tsne.fit_transform(X), dtype=np.float64)


def identity_keys(table) -> np.ndarray:
    """One key per row naming the same vector across checkpoints.

    Returns an object array of str, shape (n_rows,): "sentence_id|side|position|site|layer|head|kind".
    """
    cols = [table.meta[c].astype(str) for c in IDENTITY_COLUMNS]
    return np.array(["|".join(parts) for parts in zip(*cols)], dtype=object)


def aligned_relations(identities_per_epoch: list[np.ndarray]) -> list[dict[int, int]]:
    """AlignedUMAP's `relations`: for each pair of consecutive epochs, row in epoch t -> row of the same identity
    in epoch t + 1. Identities missing from the next epoch are skipped; a repeated identity maps its first row.

    Parameters
    ----------
    identities_per_epoch : list of np.ndarray
        One array of hashable keys per epoch, in epoch order; shape (n_rows_t,) each.

    Returns
    -------
    list of dict
        len(identities_per_epoch) - 1 dicts of int -> int.
    """
    relations = []
    for current, following in zip(identities_per_epoch[:-1], identities_per_epoch[1:]):
        where_next = {}
        for j, key in enumerate(following):
            where_next.setdefault(key, j)
        seen = set()
        relation = {}
        for i, key in enumerate(current):
            if key in where_next and key not in seen:
                relation[i] = where_next[key]
                seen.add(key)
        relations.append(relation)
    return relations


@dataclass(frozen=True)
class ProcrustesTransform:
    """points -> scale * points @ R + t, fitted by `procrustes_align`. R: (dims, dims) orthogonal, t: (dims,)."""

    R: np.ndarray
    scale: float
    t: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Shape (n, dims) -> (n, dims)."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.R + self.t

    def __iter__(self):
        return iter((self.R, self.scale, self.t))


def procrustes_align(source: np.ndarray, target: np.ndarray) -> ProcrustesTransform:
    """The rotation (reflection allowed), uniform scale and translation that best map `source` onto `target`.

    Parameters
    ----------
    source, target : np.ndarray
        Shape (n, dims) each, rows matched (row i of source is the same item as row i of target).

    Returns
    -------
    ProcrustesTransform
        Callable; `transform(source)` ~= target in the least-squares sense. Also unpacks as (R, scale, t).
    """
    S = np.asarray(source, dtype=np.float64)
    T = np.asarray(target, dtype=np.float64)
    if S.shape != T.shape or S.ndim != 2:
        raise QkvtraceError(f"procrustes needs matched (n, dims) arrays, got {S.shape} and {T.shape}")
    mu_s, mu_t = S.mean(axis=0), T.mean(axis=0)
    A, B = S - mu_s, T - mu_t
    U, sigma, Vt = np.linalg.svd(A.T @ B)  # A.T @ B: (dims, dims)
    R = U @ Vt
    norm = float((A * A).sum())
    scale = float(sigma.sum() / norm) if norm > 0 else 1.0
    return ProcrustesTransform(R, scale, mu_t - scale * mu_s @ R)


def _epoch_slices(epochs: np.ndarray, identity: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(epoch, row indices) in epoch order; identities must be unique within an epoch."""
    out = []
    for epoch in np.unique(epochs):
        rows = np.flatnonzero(epochs == epoch)
        keys, counts = np.unique(identity[rows].astype(str), return_counts=True)
        if (counts > 1).any():
            raise QkvtraceError(f"epoch {epoch}: identity {keys[counts > 1][0]!r} occurs {counts.max()} times; "
                                "each vector must appear once per epoch to be aligned across epochs")
        out.append((epoch, rows))
    return out


def project_epochs(X: np.ndarray, epochs: np.ndarray, identity: np.ndarray, method: str = "pca", dims: int = 2,
                   frame: str = "joint", seed: int = 0) -> np.ndarray:
    """Project vectors from several checkpoints into one frame.

    Parameters
    ----------
    X : np.ndarray
        Shape (n_rows, dim), all epochs' rows together.
    epochs : np.ndarray
        Shape (n_rows,), the epoch of each row.
    identity : np.ndarray
        Shape (n_rows,), a hashable key naming the same vector across epochs (see `identity_keys`).
    method, dims, seed
        As in `project`.
    frame : {"joint", "procrustes", "aligned-umap"}
        joint: one projection fitted on all rows (the study's way). procrustes: each epoch projected on its own,
        then rotated/reflected, scaled and shifted onto the last epoch using the identities both share (rows
        without a partner get the same transform). aligned-umap: umap.AlignedUMAP over the epochs, consecutive
        epochs related by identity; it requires method="umap" and raises otherwise.

    Returns
    -------
    np.ndarray
        Shape (n_rows, dims), row-aligned with X.
    """
    if frame not in FRAMES:
        raise QkvtraceError(f"unknown frame {frame!r}; choose one of: {', '.join(FRAMES)}")
    if method not in METHODS:
        raise QkvtraceError(f"unknown projection method {method!r}; choose one of: {', '.join(METHODS)}")
    X = np.asarray(X)
    epochs = np.asarray(epochs)
    identity = np.asarray(identity, dtype=object)
    if not (len(X) == len(epochs) == len(identity)):
        raise QkvtraceError(f"X, epochs and identity must have the same rows: {len(X)}, {len(epochs)}, "
                            f"{len(identity)}")
    if frame == "joint":
        return project(X, method, dims, seed)
    if frame == "aligned-umap" and method != "umap":
        raise QkvtraceError(f"aligned-umap works only with method umap, not {method!r}; use procrustes or joint "
                            "with other methods", param="frame")

    slices = _epoch_slices(epochs, identity)
    projected = "umap" if frame == "aligned-umap" else method
    for epoch, rows in slices:
        need = min_points(projected, dims)
        if len(rows) < need:
            # "select more epochs" would not help here: each epoch is projected on its own.
            raise QkvtraceError(f"{frame} projects each epoch on its own: epoch {epoch} has {len(rows)} "
                                f"points and {projected} needs at least {need}; select more sentences or kinds, "
                                "or use frame joint", param="frame")
    out = np.empty((len(X), dims), dtype=np.float64)
    if frame == "procrustes":
        last_epoch, last_rows = slices[-1]
        last = project(X[last_rows], method, dims, seed)
        out[last_rows] = last
        where_last = {key: i for i, key in enumerate(identity[last_rows])}
        for epoch, rows in slices[:-1]:
            coords = project(X[rows], method, dims, seed)
            pairs = [(i, where_last[key]) for i, key in enumerate(identity[rows]) if key in where_last]
            if len(pairs) < dims + 1:
                raise QkvtraceError(f"epoch {epoch} shares {len(pairs)} vectors with epoch {last_epoch}; "
                                    f"procrustes alignment in {dims}-D needs at least {dims + 1}")
            src, dst = np.array(pairs).T
            # Transformed once per distinct point, so copies stay exactly equal through the matrix product.
            U, inverse = unique_rows(coords)
            out[rows] = procrustes_align(coords[src], last[dst])(U)[inverse]
        return out

    # aligned-umap
    for epoch, rows in slices:
        try:
            _check(X[rows], "umap", dims)
        except QkvtraceError as e:
            raise QkvtraceError(f"aligned-umap, epoch {epoch}: {e}") from None
    if len(slices) < 2:
        return project(X, "umap", dims, seed)
    # Each epoch is embedded on its distinct vectors (copies of one vector would otherwise land apart), and the
    # relations are rewritten from rows to distinct vectors.
    distinct = [unique_rows(np.ascontiguousarray(X[rows], dtype=np.float32)) for _, rows in slices]
    for (epoch, _), (U, _) in zip(slices, distinct):
        if len(U) < min_points("umap", dims):
            raise QkvtraceError(f"aligned-umap, epoch {epoch}: only {len(U)} distinct vectors; umap needs at least "
                                f"{min_points('umap', dims)}: select more sentences or kinds, or use frame joint",
                                param="frame")
    relations = []
    for relation, (_, here), (_, there) in zip(aligned_relations([identity[rows] for _, rows in slices]),
                                               distinct, distinct[1:]):
        unique_relation, used = {}, set()
        for i, j in relation.items():
            if here[i] not in unique_relation and there[j] not in used:
                unique_relation[int(here[i])] = int(there[j])
                used.add(there[j])
        relations.append(unique_relation)
    for (epoch, _), (following, _), relation in zip(slices, slices[1:], relations):
        if not relation:
            raise QkvtraceError(f"epochs {epoch} and {following} share no vectors; aligned-umap needs the same "
                                "sentences and kinds in every epoch")
    n_min = min(len(U) for U, _ in distinct)
    umap = _import_umap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapper = umap.AlignedUMAP(n_components=dims, n_neighbors=min(15, n_min - 1), init=_umap_init(n_min, dims),
                                  random_state=seed)
        embeddings = mapper.fit_transform([U for U, _ in distinct], relations=relations)
    for (_, rows), (_, inverse), embedding in zip(slices, distinct, embeddings):
        out[rows] = np.asarray(embedding, dtype=np.float64)[inverse]
    if np.isnan(out).any():
        # AlignedUMAP puts points that ended up with no neighbour edges at NaN.
        log.warning("aligned-umap left %d of %d points unplaced (no neighbours in their epoch's graph)",
                    int(np.isnan(out).any(axis=1).sum()), len(out))
    return out


def qk_joint(Q: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and keys of one head in one picture, as AttentionViz draws them: Q * c and K / c + t.

    The keys are translated so that both centroids coincide (t = c * mean(Q) - mean(K) / c), and c is chosen so
    that queries and keys then have the same mean norm, so that a key near a query should be a key it attends to.
    Whether it is in a given head is measured by `qk_rank_correlation` (`describe_qk_joint` says it in one line):
    where queries and keys already share their centroid, as in the small models trained here, joining can make
    nearness reflect attention less well than in the vectors as extracted. Neither step changes an attention
    pattern: (c q) . (k / c) = q . k, and q . t is the same for every key a query sees, which softmax ignores.

    Parameters
    ----------
    Q : np.ndarray
        Shape (n_queries, d_head).
    K : np.ndarray
        Shape (n_keys, d_head).

    Returns
    -------
    (Q', K'), float64, the same shapes.
    """
    Q = np.asarray(Q, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    if Q.ndim != 2 or K.ndim != 2 or Q.shape[1] != K.shape[1] or not len(Q) or not len(K):
        raise QkvtraceError(f"qk_joint needs queries and keys of one width, got shapes {Q.shape} and {K.shape}")
    mean_q, centred_k = Q.mean(axis=0), K - K.mean(axis=0)
    q_norm = float(np.linalg.norm(Q, axis=1).mean())

    def gap(log_c: float) -> float:  # mean norm of Q * c minus that of K / c + t, divided by c
        c = np.exp(log_c)
        return q_norm - float(np.linalg.norm(centred_k / c ** 2 + mean_q, axis=1).mean())

    lo, hi = -30.0, 30.0
    if q_norm == 0 or gap(hi) <= 0:
        # Every query the same vector (or zero): no c equalises the norms; fall back to the norms' ratio.
        k_norm = float(np.linalg.norm(K, axis=1).mean())
        c = np.sqrt(k_norm / q_norm) if q_norm > 0 and k_norm > 0 else 1.0
    else:
        for _ in range(100):  # gap rises from < 0 to > 0 on [lo, hi]: bisection on log c
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
        c = float(np.exp((lo + hi) / 2))
    return Q * c, K / c + (c * mean_q - K.mean(axis=0) / c)


def qk_joint_epochs(X: np.ndarray, is_query: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """`qk_joint` applied to each epoch's rows of X (n, d_head): is_query (n,) bool marks queries, the rest are
    keys. Returns the transformed (n, d_head) float64."""
    X = np.asarray(X, dtype=np.float64)
    out = np.empty_like(X)
    for epoch in np.unique(epochs):
        q = np.flatnonzero((epochs == epoch) & is_query)
        k = np.flatnonzero((epochs == epoch) & ~is_query)
        if not len(q) or not len(k):
            raise QkvtraceError(f"qk-joint: epoch {epoch} has {len(q)} queries and {len(k)} keys; it needs both")
        out[q], out[k] = qk_joint(X[q], X[k])
    return out


QK_PAIR_COLUMNS = ("epoch", "sentence_id", "site", "layer", "head", "position")  # what qk_pairs reads of meta


def qk_pairs(meta, is_query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The query-key pairs that attention relates among rows of a q/k selection: (query rows, key rows), index
    arrays of one length. A pair shares its epoch, sentence, site, layer and head; at decoder.self the key's
    position is at most the query's (the causal mask)."""
    is_query = np.asarray(is_query, dtype=bool)
    group = [np.asarray(meta[c]).astype(str) for c in QK_PAIR_COLUMNS[:-1]]
    keys = np.array(["\x1f".join(parts) for parts in zip(*group)]) if len(is_query) else np.array([], dtype=str)
    position = np.asarray(meta["position"]).astype(np.int64)
    causal = np.asarray(meta["site"]).astype(str) == "decoder.self"
    by_group: dict[str, list[int]] = {}
    for i in np.flatnonzero(~is_query):
        by_group.setdefault(keys[i], []).append(i)
    qi, ki = [], []
    for i in np.flatnonzero(is_query):
        ks = np.asarray(by_group.get(keys[i], []), dtype=np.int64)
        if causal[i]:
            ks = ks[position[ks] <= position[i]]
        qi.append(np.full(len(ks), i, dtype=np.int64))
        ki.append(ks)
    return (np.concatenate(qi) if qi else np.zeros(0, np.int64)), (np.concatenate(ki) if ki else np.zeros(0, np.int64))


def qk_rank_correlation(X: np.ndarray, shown: np.ndarray, is_query: np.ndarray, meta) -> tuple[float, int]:
    """How well nearness in a picture of queries and keys reflects attention: Spearman's rank correlation, over
    every query-key pair attention relates (`qk_pairs`), between minus the Euclidean distance of the shown
    vectors (`shown`, e.g. after `qk_joint`) and the attention logit q . k of the original ones (`X`).

    Returns (correlation, number of pairs); the correlation is NaN with fewer than 3 pairs or a constant side.
    """
    qi, ki = qk_pairs(meta, is_query)
    return _nearness_follows_logit(X, shown, qi, ki), len(qi)


def _nearness_follows_logit(X: np.ndarray, shown: np.ndarray, qi: np.ndarray, ki: np.ndarray) -> float:
    """Spearman's correlation of -|shown[q] - shown[k]| with X[q] . X[k] over the pairs (qi, ki); NaN with fewer
    than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(qi) < 3:
        return float("nan")
    X = np.asarray(X, dtype=np.float64)
    shown = np.asarray(shown, dtype=np.float64)
    logit = np.einsum("ij,ij->i", X[qi], X[ki])
    nearness = -np.linalg.norm(shown[qi] - shown[ki], axis=1)
    if np.ptp(logit) == 0 or np.ptp(nearness) == 0:
        return float("nan")
    return float(spearmanr(nearness, logit)[0])


def describe_qk_joint(X: np.ndarray, joined: np.ndarray, is_query: np.ndarray, meta) -> tuple[str, str]:
    """Whether joining queries and keys (`qk_joint`) made nearness reflect attention better, measured with
    `qk_rank_correlation` on the vectors as extracted and as joined. Returns (one sentence, a short form for a
    figure title)."""
    qi, ki = qk_pairs(meta, is_query)  # once for both measurements
    before, after, pairs = _nearness_follows_logit(X, X, qi, ki), _nearness_follows_logit(X, joined, qi, ki), len(qi)
    if np.isnan(before) or np.isnan(after):
        return (f"queries and keys joined; with {pairs} query-key pair(s) of one sentence in the selection, "
                f"nearness is not compared with attention", "queries and keys joined")
    verdict = ("nearness reflects attention better than" if after > before else
               "nearness reflects attention less well than" if after < before else "as well as")
    return (f"queries and keys joined: rank correlation of -distance with q.k over {pairs:,} query-key pairs "
            f"{before:+.2f} as extracted, {after:+.2f} joined ({verdict} in the vectors as extracted)",
            f"queries and keys joined (rank corr. of -distance with q.k {before:+.2f} -> {after:+.2f})")


def cosine_matrix(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of A with every row of B: (n, d), (m, d) -> (n, m). A zero row gives 0."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise QkvtraceError(f"cosine needs (n, d) and (m, d) matrices of the same width, got {A.shape} and {B.shape}")
    An = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)
    Bn = B / np.maximum(np.linalg.norm(B, axis=1, keepdims=True), 1e-12)
    return An @ Bn.T


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear centred kernel alignment of (n, d1) and (n, d2) representations of the same n rows.

    1 when Y is X rotated and scaled; near 0 for unrelated representations (biased upwards when n is small
    relative to the widths). NaN when either matrix is constant.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise QkvtraceError(f"CKA needs two matrices with the same rows, got {X.shape} and {Y.shape}")
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    cross = np.linalg.norm(Y.T @ X) ** 2  # Y.T @ X: (d2, d1)
    denom = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(cross / denom) if denom > 0 else float("nan")


def _labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels).astype(str)
    if labels.shape != (n,):
        raise QkvtraceError(f"expected one label per point ({n}), got shape {labels.shape}")
    return labels


def silhouette(X: np.ndarray, labels, metric: str = "cosine") -> float:
    """Mean silhouette of the labelled groups in X (n, d); NaN unless 2 <= n_labels <= n - 1."""
    X = np.asarray(X, dtype=np.float64)
    labels = _labels(labels, len(X))
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(X) - 1:
        return float("nan")
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(X, labels, metric=metric))


def neighbour_purity(X: np.ndarray, labels, k: int = 5, metric: str = "cosine") -> float:
    """Mean fraction of each point's k nearest neighbours (itself excluded) that share its label.

    X: (n, d). k is capped at n - 1; NaN for fewer than 2 points.
    """
    X = np.asarray(X, dtype=np.float64)
    labels = _labels(labels, len(X))
    n = len(X)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    from sklearn.metrics import pairwise_distances

    hits = 0
    for start in range(0, n, 1024):  # blocks of rows keep memory at 1024 x n distances
        rows = np.arange(start, min(start + 1024, n))
        D = pairwise_distances(X[rows], X, metric=metric)  # (block, n)
        D[np.arange(len(rows)), rows] = np.inf  # by index, so an identical twin still counts as a neighbour
        nearest = np.argsort(D, axis=1, kind="stable")[:, :k]  # (block, k)
        hits += int((labels[nearest] == labels[rows, None]).sum())
    return hits / (n * k)
