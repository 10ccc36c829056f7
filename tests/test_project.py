import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest

from qkvtrace.errors import QkvtraceError
from qkvtrace.project import (aligned_relations, cosine_matrix, identity_keys, linear_cka, neighbour_purity,
                              procrustes_align, project, project_epochs, silhouette)
from qkvtrace.table import VectorTable


def make_table(n_sentences=2, words=("we", "eat", "apple"), kinds=("q", "k"), epochs=(1, 30), dim=8, seed=0):
    """A small VectorTable with the columns extract writes: one row per sentence, word, kind and epoch."""
    rng = np.random.default_rng(seed)
    rows = []
    for epoch in epochs:
        for s in range(n_sentences):
            for pos, word in enumerate(words):
                for kind in kinds:
                    rows.append(dict(epoch=epoch, sentence_id=s, sentence=" ".join(words) + f" {s}", side="src",
                                     position=pos, token=word, transition="", site="encoder.self", layer=0,
                                     head="concat", kind=kind, label=f"{word}@{kind}@{epoch}", dim=dim))
    meta = {c: np.array([r[c] for r in rows], dtype=np.int64 if isinstance(rows[0][c], int) else object)
            for c in rows[0]}
    return VectorTable(meta, rng.normal(size=(len(rows), dim)).astype(np.float32))


def random_rotation(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.fixture
def X40():
    return np.random.default_rng(0).normal(size=(40, 12))


@pytest.mark.parametrize("method", ["pca", "umap", "tsne"])
def test_project_shape_and_seed(X40, method, umap_compiled):
    a = project(X40, method, dims=2, seed=3)
    b = project(X40, method, dims=2, seed=3)
    assert a.shape == (40, 2)
    np.testing.assert_allclose(a, b)


def test_project_3d_and_pca_values(X40):
    Y = project(X40, "pca", dims=3)
    assert Y.shape == (40, 3)
    # PCA coordinates keep the total variance along the first components, in decreasing order
    var = Y.var(axis=0)
    assert var[0] >= var[1] >= var[2]


@pytest.mark.parametrize("method", ["umap", "tsne"])
def test_project_adapts_to_small_n(method, umap_compiled):
    X = np.random.default_rng(1).normal(size=(10, 6))
    assert project(X, method, dims=2).shape == (10, 2)
    assert project(X, method, dims=3).shape == (10, 3)


@pytest.mark.parametrize("method,n,need", [("pca", 1, 2), ("umap", 3, 4), ("tsne", 4, 5)])
def test_too_few_points(method, n, need):
    X = np.ones((n, 6)) + np.arange(n)[:, None]
    with pytest.raises(QkvtraceError, match=rf"{method} needs at least {need} points; the selection has {n}"):
        project(X, method)


def test_bad_method_and_pca_dims():
    with pytest.raises(QkvtraceError, match="unknown projection method 'mds'"):
        project(np.zeros((5, 3)), "mds")
    with pytest.raises(QkvtraceError, match="pca to 3 dimensions"):
        project(np.random.default_rng(0).normal(size=(2, 4)), "pca", dims=3)


def test_procrustes_recovers_similarity_transform():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    R = random_rotation(3, 1)
    R[:, 0] *= -1  # include a reflection
    dst = 2.5 * src @ R + np.array([1.0, -2.0, 0.5])
    transform = procrustes_align(src, dst)
    assert np.abs(transform(src) - dst).max() < 1e-6
    R_fit, scale, t = transform
    np.testing.assert_allclose(scale, 2.5)
    np.testing.assert_allclose(R_fit @ R_fit.T, np.eye(3), atol=1e-10)


def test_project_epochs_procrustes_aligns_rotated_copy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 5)) * np.array([5, 3, 1, 0.2, 0.1])
    later = base @ random_rotation(5, 2) + 3.0  # the same geometry in another basis
    X = np.vstack([base, later])
    epochs = np.repeat([1, 30], 12)
    identity = np.tile([f"id{i}" for i in range(12)], 2)
    Y = project_epochs(X, epochs, identity, "pca", dims=2, frame="procrustes")
    assert np.abs(Y[:12] - Y[12:]).max() < 1e-6
    # joint frame keeps the two epochs apart
    J = project_epochs(X, epochs, identity, "pca", dims=2, frame="joint")
    assert np.abs(J[:12] - J[12:]).max() > 1.0


def test_project_epochs_procrustes_unmatched_rows_follow_transform():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 4)) * np.array([4, 2, 0.1, 0.1])
    X = np.vstack([base, base])
    epochs = np.repeat([1, 2], 10)
    identity = np.array([f"a{i}" for i in range(10)] + [f"a{i}" for i in range(9)] + ["only-late"], dtype=object)
    Y = project_epochs(X, epochs, identity, "pca", frame="procrustes")
    assert np.abs(Y[:9] - Y[10:19]).max() < 1e-6
    assert np.isfinite(Y).all()


def test_project_epochs_rejects_duplicates_and_bad_frame():
    X = np.random.default_rng(0).normal(size=(8, 3))
    epochs = np.repeat([1, 2], 4)
    with pytest.raises(QkvtraceError, match="occurs 2 times"):
        project_epochs(X, epochs, np.array(["a", "a", "b", "c"] * 2, dtype=object), frame="procrustes")
    with pytest.raises(QkvtraceError, match="aligned-umap works only with method umap"):
        project_epochs(X, epochs, np.array(list("abcd") * 2, dtype=object), "pca", frame="aligned-umap")
    with pytest.raises(QkvtraceError, match="unknown frame"):
        project_epochs(X, epochs, np.array(list("abcd") * 2, dtype=object), frame="diagonal")


def test_aligned_relations_maps_identities():
    rel = aligned_relations([np.array(["a", "b", "c"]), np.array(["c", "a", "x"]), np.array(["a"])])
    assert rel == [{0: 1, 2: 0}, {1: 0}]


def test_project_epochs_aligned_umap_runs(umap_compiled):
    table = make_table(n_sentences=2, words=("we", "eat", "apple", "bread"), kinds=("q", "k"), epochs=(1, 15, 30))
    Y = project_epochs(table.vectors(), table.meta["epoch"], identity_keys(table), "umap", dims=2,
                       frame="aligned-umap", seed=0)
    Y2 = project_epochs(table.vectors(), table.meta["epoch"], identity_keys(table), "umap", dims=2,
                        frame="aligned-umap", seed=0)
    assert Y.shape == (len(table), 2) and np.isfinite(Y).all()
    np.testing.assert_allclose(Y, Y2)
    # umap jits AlignedUMAP's epoch function anew on every call; ours is made once, cached on disk
    import umap.layouts
    from numba.core.caching import NullCache

    made = list(umap.layouts.numba._made.values())
    assert len(made) == 1 and not isinstance(made[0]._cache, NullCache)


def test_identity_keys_match_across_epochs():
    table = make_table()
    keys = identity_keys(table)
    assert keys[0] == "0|src|0|encoder.self|0|concat|q"
    first, last = keys[table.meta["epoch"] == 1], keys[table.meta["epoch"] == 30]
    assert list(first) == list(last) and len(set(first)) == len(first)


def test_linear_cka():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 10))
    assert linear_cka(X, 3 * X @ random_rotation(10) + 1) == pytest.approx(1.0)
    assert linear_cka(X, rng.normal(size=(200, 10))) < 0.15


def test_cosine_matrix_by_hand():
    A = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    B = np.array([[0.0, 2.0], [3.0, 3.0]])
    expected = np.array([[0.0, 1 / np.sqrt(2)], [1 / np.sqrt(2), 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_matrix(A, B), expected)


def test_silhouette_and_purity():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 10
    labels = np.repeat(["apple", "bread", "book"], 20)
    X = np.repeat(centres, 20, axis=0) + rng.normal(scale=0.3, size=(60, 8))
    assert silhouette(X, labels) > 0.8
    assert neighbour_purity(X, labels, k=5) == 1.0
    shuffled = rng.permutation(labels)
    assert silhouette(X, shuffled) < 0.1
    assert neighbour_purity(X, shuffled, k=5) < 0.6
    assert np.isnan(silhouette(X, np.zeros(60)))


def test_purity_counts_identical_twins_as_neighbours():
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert neighbour_purity(X, ["a", "a", "b"], k=1, metric="euclidean") == pytest.approx(2 / 3)


def test_aligned_relations_from_a_table_map_each_identity_to_itself():
    # Rows of each epoch in a different order, one vector missing from the last epoch: every relation must join
    # a row to the row of the same (sentence, position, site, layer, head, kind) in the next epoch.
    table = make_table(n_sentences=2, words=("we", "eat", "apple"), kinds=("q", "k", "v"), epochs=(1, 15, 30))
    rng = np.random.default_rng(0)
    per_epoch = []
    for epoch in (1, 15, 30):
        rows = np.flatnonzero(table.meta["epoch"] == epoch)
        rows = rng.permutation(rows)[: len(rows) - (epoch == 30)]
        per_epoch.append(identity_keys(table.rows(rows)))
    relations = aligned_relations(per_epoch)
    assert len(relations) == 2
    for relation, now, following in zip(relations, per_epoch, per_epoch[1:]):
        assert all(now[i] == following[j] for i, j in relation.items())
        assert len(set(relation.values())) == len(relation)
        assert len(relation) == len(set(now) & set(following))
    assert len(relations[0]) == 18 and len(relations[1]) == 17


def test_per_epoch_frames_say_the_epoch_is_too_small():
    # procrustes and aligned-umap project each epoch on its own, so "select more epochs" would not help.
    X = np.random.default_rng(0).normal(size=(12, 6))
    epochs = np.repeat([1, 15, 30], 4)
    identity = np.tile(list("abcd"), 3).astype(object)
    with pytest.raises(QkvtraceError, match=r"frame procrustes projects each epoch on its own: epoch 1 has 4 points "
                                            r"and tsne needs at least 5; select more sentences or kinds"):
        project_epochs(X, epochs, identity, "tsne", frame="procrustes")
    with pytest.raises(QkvtraceError, match="epoch 1 has 4 points and umap needs at least 5"):
        project_epochs(X, epochs, identity, "umap", dims=3, frame="aligned-umap")
    assert project_epochs(X, epochs, identity, "tsne", frame="joint").shape == (12, 2)  # 12 points jointly


@pytest.mark.parametrize("n,d,dims", [(40, 12, 2), (40, 12, 3), (5, 64, 3), (3, 2, 2)])
def test_pca_equals_sklearn(n, d, dims):
    from sklearn.decomposition import PCA

    X = np.random.default_rng(n + d).normal(size=(n, d)) * np.linspace(3, 0.5, d)  # distinct variances
    np.testing.assert_allclose(project(X, "pca", dims=dims),
                               PCA(n_components=dims, svd_solver="full").fit_transform(X), atol=1e-10)
