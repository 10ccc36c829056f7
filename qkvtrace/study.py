"""The word-context clustering study's verdict functions: each claim of the study decided by numbers and a stated rule.

The study itself is an experiment file shipped inside the package (`qkvtrace/data/study.toml`, the same as
`experiments/study.toml`): its sentence sets, figures and `[[verdicts]]`. Each `[[verdicts]]` entry names a type in
`VERDICTS`; the experiment runner hands the type's function a `data` object that extracts each sentence set once
(`data.table(...)`, `data.similarity(...)`, `data.translate(...)`) and gets back `Verdict`s and report blocks.
The functions below take VectorTables and SimilarityTables, so each can be tested alone.

`run_study()` runs that file for one or more seeds (one cached run per seed) and reports whether the verdicts agree.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qkvtrace.errors import QkvtraceError

QKV = ("q", "k", "v")
POST = ("x1", "x4", "layer_out")   # the study's names: x1 = z, x4 = attn_out
ALL_KINDS = QKV + POST

# Thresholds the verdicts use (each verdict states its rule).
IDENTICAL = 0.9999      # cosine at or above: the same vector up to float rounding
SEPARATE = 0.2          # silhouette at or above: vectors separate by category
NO_CLUSTER = 0.05       # silhouette at or below: no separation by category
KEEPS = 0.9             # cosine at or above: "similar" / "the same" (a token keeps its vector)
BOOTSTRAP = 200         # bootstrap resamples for the 95% intervals
FOLDS = 5               # cross-validation folds of the linear probe

VERDICT_WORDS = ("holds", "partly", "does not hold")


@dataclass
class Verdict:
    key: str                  # stable id of the claim, e.g. "c2" (the same across seeds)
    claim: str
    verdict: str              # "holds" | "partly" | "does not hold"
    rule: str                 # the threshold and how it was applied
    evidence: str             # the deciding numbers, in words
    numbers: dict = field(default_factory=dict)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _r(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


def _grade(all_ok: bool, some_ok: bool) -> str:
    return "holds" if all_ok else ("partly" if some_ok else "does not hold")


# --------------------------------------------------------------------------------------------------------------
# (a) same token, same position

def verdict_same_position(table, word: str = "eat") -> Verdict:
    """(a) Layer-0 encoder q/k/v of the same token at the same position are identical across two sentences, and the
    post-attention vectors (x1, x4, layer_out) separate them. `table`: encoder.self rows of `word` in two sentences
    (sentence_id 0 and 1), kinds q, k, v, x1, x4, layer_out, layer 0 at least, several epochs."""
    numbers: dict = {}
    for epoch in sorted(set(table.meta["epoch"].tolist())):
        for layer in sorted(set(table.meta["layer"].tolist())):
            for kind in ALL_KINDS:
                t = table.where(epoch=epoch, layer=layer, kind=kind, token=word)
                a, b = (t.where(sentence_id=i).vectors()[0] for i in (0, 1))
                numbers[f"epoch {epoch} layer {layer} {kind}"] = _r(cos(a, b), 6)
    last = max(table.meta["epoch"])
    qkv0 = [numbers[k] for k in numbers if " layer 0 " in k and k.split()[-1] in QKV]
    post0 = {k: numbers[f"epoch {last} layer 0 {k}"] for k in POST}
    identical = min(qkv0) >= IDENTICAL
    separated = [k for k, c in post0.items() if c < IDENTICAL]
    verdict = "holds" if identical and len(separated) == len(POST) else (
        "partly" if identical or separated else "does not hold")
    return Verdict(
        "a", f'Same token, same position: layer-0 encoder q, k, v of "{word}" are identical in the two sentences, '
             "and x1, x4 and layer_out separate them",
        verdict,
        f"identical: cosine ≥ {IDENTICAL} for q, k, v at layer 0 at every epoch; separated: cosine < {IDENTICAL}"
        f" for each of x1, x4, layer_out at layer 0, epoch {last}",
        f"layer-0 q/k/v cosine min {min(qkv0):.6f}; epoch {last} layer 0: "
        + ", ".join(f"{k} {c:.4f}" for k, c in post0.items()),
        numbers)


# --------------------------------------------------------------------------------------------------------------
# (b) decoder vectors more scattered than encoder vectors

def spread(X: np.ndarray) -> float:
    """Mean pairwise cosine distance (1 - cosine) over all pairs of distinct rows of X (n, d): 0 when every vector
    points the same way, 1 for orthogonal ones on average. Scale-free, so wider norms do not count as scatter."""
    Xn = X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12)
    iu = np.triu_indices(len(Xn), 1)
    return float(np.mean(1.0 - (Xn @ Xn.T)[iu]))


def verdict_decoder_scatter(table) -> Verdict:
    """(b) Decoder self-attention vectors are more scattered than the encoder's. `table`: encoder.self and
    decoder.self rows (every token) of the same sentences, kinds q, k, v, x1, layer 0, one epoch."""
    kinds = ("q", "k", "v", "x1")
    enc = {k: spread(table.where(site="encoder.self", kind=k).vectors()) for k in kinds}
    dec = {k: spread(table.where(site="decoder.self", kind=k).vectors()) for k in kinds}
    wider = [k for k in kinds if dec[k] > enc[k]]
    epoch = int(table.meta["epoch"][0])
    return Verdict(
        "b", "Decoder vectors are more scattered than encoder vectors (decoder self-attention vs encoder "
             "self-attention, every token of the same sentences)",
        _grade(len(wider) == len(kinds), bool(wider)),
        "spread = mean pairwise cosine distance (1 − cosine) among a kind's vectors, layer 0, epoch "
        f"{epoch}; holds if the decoder's spread exceeds the encoder's for every one of q, k, v, x1, partly if for "
        "some",
        "spread encoder / decoder: " + ", ".join(f"{k} {enc[k]:.3f} / {dec[k]:.3f}" for k in kinds)
        + f"; decoder wider for {len(wider)} of {len(kinds)}",
        {"encoder": {k: _r(v) for k, v in enc.items()}, "decoder": {k: _r(v) for k, v in dec.items()}})


# --------------------------------------------------------------------------------------------------------------
# (c) permutation

def diagonal(t) -> np.ndarray:
    """Cosines of the same row and column index (the same decoder step in both sentences)."""
    n = min(len(t.rows), len(t.cols))
    return np.array([t.matrix[i, i] for i in range(n)])


def same_word(t) -> np.ndarray:
    """Cosines of the same word in both sentences, wherever it stands (the reverse diagonal of a permutation)."""
    return np.array([t.matrix[i, t.cols.index(r)] for i, r in enumerate(t.rows) if r in t.cols])


def verdict_permutation(tables: dict, translations: tuple[str, str]) -> list[Verdict]:
    """(c) The permutation claims, each on its own. `tables`: {(kind, layer): SimilarityTable} at decoder.cross for
    kinds q, k, v, x4 and pattern, every layer, one epoch; `translations`: the two greedy translations."""
    layers = sorted({layer for _, layer in tables})
    t0 = next(iter(tables.values()))
    a, b = t0.sentence_a, t0.sentence_b
    same_tr = translations[0] == translations[1]
    tr = f'translations "{translations[0]}" / "{translations[1]}"'

    def decide(key, claim, kinds, measure, where):
        vals = {(k, la): measure(tables[(k, la)]) for k in kinds for la in layers}
        means = {kl: float(np.mean(v)) if len(v) else float("nan") for kl, v in vals.items()}
        mins = {kl: float(np.min(v)) if len(v) else float("nan") for kl, v in vals.items()}
        verdict = _grade(all(m >= KEEPS for m in mins.values()), all(m >= KEEPS for m in means.values()))
        return Verdict(
            key, claim, verdict,
            f"{where} cosine at decoder-encoder attention, every layer: holds if every one is ≥ {KEEPS}, partly if "
            f"their mean is ≥ {KEEPS} for each kind and layer",
            "; ".join(f"{k} layer {la} mean {means[(k, la)]:.3f} (min {mins[(k, la)]:.3f})" for k, la in vals)
            + f"; {tr}",
            {f"{k} layer {la}": {"mean": _r(means[(k, la)]), "min": _r(mins[(k, la)])} for k, la in vals}
            | {"same_translation": same_tr})

    return [
        decide("c1", f'Permutation, "{a}" vs "{b}": decoder Q is similar along the diagonal (the same decoder '
                     "step)", ("q",), diagonal, "diagonal (same decoder step)"),
        decide("c2", "Permutation: K and V of the same word are (nearly) equal at its other position (the reverse "
                     "diagonal)", ("k", "v"), same_word, "same-word"),
        decide("c3", "Permutation: x4 (decoder-encoder attention output) is the same along the diagonal", ("x4",),
               diagonal, "diagonal (same decoder step)"),
        decide("c4", "Permutation: attention is the same for the same items (each decoder step's weights, keys "
                     "matched by word)", ("pattern",), diagonal, "diagonal (same decoder step)"),
    ]


# --------------------------------------------------------------------------------------------------------------
# (d) five sentences

def mean_pairwise_cosine(X: np.ndarray) -> float:
    return 1.0 - spread(X)


def verdict_five_sentences(table, word: str = "eat") -> Verdict:
    """(d) q, k, v of `word` stay similar across the five sentences while x1, x4 and src_final scatter. `table`:
    encoder.self rows of `word`, one per sentence, kinds q, k, v, x1, x4 at layer 0 and layer_out at the last layer
    (src_final), one epoch."""
    last_layer = max(table.meta["layer"])
    X = {k: table.where(kind=k, layer=0).vectors() for k in ("q", "k", "v", "x1", "x4")}
    X["src_final"] = table.where(kind="layer_out", layer=last_layer).vectors()
    m = {k: mean_pairwise_cosine(v) for k, v in X.items()}
    similar = [k for k in QKV if m[k] >= KEEPS]
    scatter = [k for k in ("x1", "x4", "src_final") if m[k] < KEEPS]
    n = len(X["q"])
    return Verdict(
        "d", f'Five sentences: q, k, v of "{word}" stay similar across the {n} sentences while x1, x4 and src_final '
             "scatter",
        _grade(len(similar) == 3 and len(scatter) == 3, bool(similar) and bool(scatter)),
        f"mean pairwise cosine between the sentences' vectors, encoder layer 0 (src_final: last layer's output), "
        f"epoch {int(table.meta['epoch'][0])}; similar: ≥ {KEEPS}; scattered: < {KEEPS}; holds if q, k, v are all "
        "similar and x1, x4, src_final all scattered, partly if some of each",
        "mean pairwise cosine: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()),
        {k: _r(v) for k, v in m.items()})


# --------------------------------------------------------------------------------------------------------------
# (e) clustering by context, with intervals and a probe

def cluster_scores(table, labels_column: str = "category", k: int = 5) -> dict:
    """Silhouette (cosine) and k-NN purity of rows grouped by `labels_column`, per (epoch, layer, kind)."""
    from qkvtrace.project import neighbour_purity, silhouette

    out = {}
    for epoch in sorted(set(table.meta["epoch"].tolist())):
        for layer in sorted(set(table.meta["layer"].tolist())):
            for kind in list(dict.fromkeys(table.meta["kind"].tolist())):
                t = table.where(epoch=epoch, layer=layer, kind=kind)
                X, y = t.vectors(), t.meta[labels_column]
                out[(epoch, layer, kind)] = (_r(silhouette(X, y)), _r(neighbour_purity(X, y, k=k)))
    return out


def _cosine_distances(X: np.ndarray) -> np.ndarray:
    Xn = X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12)
    return np.clip(1.0 - Xn @ Xn.T, 0.0, 2.0)


def _silhouette_purity(D: np.ndarray, y: np.ndarray, origin: np.ndarray, k: int) -> tuple[float, float]:
    """Silhouette and k-NN purity from a distance matrix D (n, n) and labels y (n,), where rows with the same
    `origin` (bootstrap copies of one sample, or the sample itself) are neither each other's neighbours nor counted
    in each other's distances. Without copies it equals project.silhouette and project.neighbour_purity."""
    ok = origin[:, None] != origin[None, :]                        # (n, n) pairs that count
    labels, yi = np.unique(y, return_inverse=True)
    onehot = np.eye(len(labels))[yi]                               # (n, n_labels)
    sums, counts = (D * ok) @ onehot, ok.astype(float) @ onehot    # (n, n_labels) each
    rows = np.arange(len(y))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts                                       # nan where a label has no counted row
    a = mean[rows, yi]
    other = mean.copy()
    other[rows, yi] = np.nan
    b = np.nanmin(np.where(counts > 0, other, np.nan), axis=1)
    alone = counts[rows, yi] == 0                                  # sklearn gives a singleton 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sil = np.where(alone, 0.0, (b - a) / np.maximum(a, b))
    sil = np.nan_to_num(sil, nan=0.0)
    nearest = np.argsort(np.where(ok, D, np.inf), axis=1, kind="stable")[:, :k]   # (n, k)
    return float(sil.mean()), float(np.mean(yi[nearest] == yi[:, None]))


def bootstrap_scores(X: np.ndarray, y: np.ndarray, k: int = 5, n: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Silhouette (cosine) and k-NN purity with percentile 95% bootstrap intervals (rows resampled with
    replacement, `n` times, seeded). Returns {"silhouette": (value, low, high), "purity": (value, low, high)}."""
    y = np.asarray(y).astype(str)
    D = _cosine_distances(X)
    value = _silhouette_purity(D, y, np.arange(len(y)), k)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        samples.append(_silhouette_purity(D[np.ix_(idx, idx)], y[idx], idx, k))
    s = np.array(samples)
    lo, hi = np.percentile(s, [2.5, 97.5], axis=0)
    return {"silhouette": (value[0], float(lo[0]), float(hi[0])), "purity": (value[1], float(lo[1]), float(hi[1]))}


def control_labels(objects: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The control task of Hewitt & Liang (2019): each word type (here the object word that sets the category) gets
    a random label drawn from the real labels' distribution over types, the same for all its occurrences."""
    rng = np.random.default_rng(seed)
    types = sorted(set(objects.tolist()))
    real = {t: labels[objects == t][0] for t in types}
    shuffled = rng.permutation([real[t] for t in types])
    return np.array([dict(zip(types, shuffled))[o] for o in objects], dtype=object)


def stratified_folds(labels: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Each sample's test fold, as sklearn's `StratifiedKFold(n_splits, shuffle=True, random_state=seed)` assigns
    them (the same folds: a test compares the two): every class spread evenly over the folds, shuffled within it."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    encoded = np.unique(first, return_inverse=True)[1][inverse]  # classes numbered by first appearance
    n_classes = int(encoded.max()) + 1
    ordered = np.sort(encoded)
    allocation = np.array([np.bincount(ordered[i::n_splits], minlength=n_classes) for i in range(n_splits)])
    rng = np.random.RandomState(seed)
    folds = np.empty(len(labels), dtype=int)
    for k in range(n_classes):
        of_class = np.arange(n_splits).repeat(allocation[:, k])
        rng.shuffle(of_class)
        folds[encoded == k] = of_class
    return folds


def fit_logistic(X: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0, tol: float = 1e-10,
                 max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with an L2 penalty on the weights (not the intercepts): the minimum of
    C * sum(cross-entropy) + ||W||² / 2, sklearn's `LogisticRegression(C=C)` objective, by Newton's method with
    backtracking (the problem is small and strictly convex: 10-20 steps). X (n, d) float, y (n,) ints in
    [0, n_classes). Returns W (d, n_classes) and b (n_classes,)."""
    n, d = X.shape
    K = n_classes
    Xb = np.hstack([X, np.ones((n, 1))])               # (n, d+1): the intercept as a last, unpenalised column
    Y = np.eye(K)[y]                                   # (n, K) one-hot
    penalty = np.ones((d + 1, 1))
    penalty[-1] = 0.0

    def objective(theta):                             # theta (d+1, K)
        logits = Xb @ theta
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -C * float((Y * log_p).sum()) + 0.5 * float((penalty * theta ** 2).sum()), np.exp(log_p)

    theta = np.zeros((d + 1, K))
    value, P = objective(theta)
    for _ in range(max_iter):
        grad = C * Xb.T @ (P - Y) + penalty * theta    # (d+1, K)
        # Hessian over (feature, class) pairs: C * sum_i x_i x_iᵀ ⊗ (diag(p_i) - p_i p_iᵀ), plus the penalty; the
        # intercepts' shared shift leaves the objective unchanged, so a tiny ridge keeps the system solvable.
        A = C * (P[:, :, None] * np.eye(K) - P[:, :, None] * P[:, None, :])  # (n, K, K)
        H = Xb.T @ (A.reshape(n, K * K, 1) * Xb[:, None, :]).reshape(n, -1)  # (d+1, K*K*(d+1)) by one matmul
        H = H.reshape(d + 1, K, K, d + 1).transpose(0, 1, 3, 2).reshape((d + 1) * K, (d + 1) * K)
        H[np.diag_indices_from(H)] += np.repeat(penalty[:, 0], K) + 1e-12
        step = np.linalg.solve(H, grad.reshape(-1)).reshape(d + 1, K)
        t = 1.0
        while True:
            new_value, new_P = objective(theta - t * step)
            if new_value <= value - 1e-4 * t * float((grad * step).sum()) or t < 1e-8:
                break
            t *= 0.5
        theta, decrease = theta - t * step, value - new_value
        value, P = new_value, new_P
        if decrease <= tol * max(1.0, abs(value)):
            break
    return theta[:-1], theta[-1]


def probe(X: np.ndarray, y: np.ndarray, control: np.ndarray, seed: int = 0) -> dict:
    """Cross-validated (stratified, FOLDS folds, seeded) logistic-regression accuracy on the task `y` and on the
    control task; selectivity = accuracy - control accuracy.

    The pipeline of sklearn's `cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), X, labels,
    cv=StratifiedKFold(FOLDS, shuffle=True, random_state=seed))`, written over numpy: the same folds and the
    same optimum (a test compares them), without importing sklearn and scipy (0.7 s of the study's 5)."""
    X = np.asarray(X, dtype=np.float64)

    def accuracy(labels):
        classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        counts = np.bincount(codes)
        if len(counts) < 2:
            return 1.0   # one class: always right
        folds = stratified_folds(codes, max(2, min(FOLDS, int(counts.min()))), seed)
        scores = []
        for f in range(int(folds.max()) + 1):
            train, test = folds != f, folds == f   # every fold has test rows: n_splits <= the smallest class
            mean, std = X[train].mean(axis=0), X[train].std(axis=0)
            std[std == 0] = 1.0                          # StandardScaler leaves constant features unscaled
            present = np.unique(codes[train])            # a fold's training part may lack a rare class
            remap = np.full(len(classes), -1)
            remap[present] = np.arange(len(present))
            W, b = fit_logistic((X[train] - mean) / std, remap[codes[train]], len(present))
            predicted = present[np.argmax((X[test] - mean) / std @ W + b, axis=1)]
            scores.append(float(np.mean(predicted == codes[test])))
        return float(np.mean(scores))

    acc, ctl = accuracy(np.asarray(y)), accuracy(np.asarray(control))
    return {"accuracy": acc, "control": ctl, "selectivity": acc - ctl}


def object_words(sentences) -> np.ndarray:
    """The object word of each built-in sentence (its last word: "i can buy apple" -> "apple")."""
    return np.array([str(s).split()[-1] for s in sentences], dtype=object)


def verdict_context_clustering(table, word: str = "buy", seed: int = 0, k: int = 5,
                               n_bootstrap: int = BOOTSTRAP) -> Verdict:
    """(e) Post-attention vectors of `word` separate by the object's category while its q/k/v don't.
    `table`: encoder.self rows of `word` across many sentences, with a `category` column, several epochs."""
    last = max(table.meta["epoch"])
    t = table.where(epoch=last, layer=0)
    kinds = [k_ for k_ in ALL_KINDS if k_ in set(t.meta["kind"].tolist())]
    boot, probes = {}, {}
    for kind in kinds:
        tk = t.where(kind=kind)
        X, y = tk.vectors(), tk.meta["category"].astype(str)
        boot[kind] = bootstrap_scores(X, y, k=k, n=n_bootstrap, seed=seed)
        probes[kind] = probe(X, y, control_labels(object_words(tk.meta["sentence"]), y, seed), seed)
    sil = {kd: boot[kd]["silhouette"][0] for kd in kinds}
    qkv_max = max(sil[kd] for kd in QKV)
    post_max = max(sil[kd] for kd in POST)
    verdict = _grade(post_max >= SEPARATE and qkv_max <= NO_CLUSTER,
                     post_max >= SEPARATE or post_max > qkv_max + NO_CLUSTER)
    n = {c: int((t.where(kind="q").meta["category"] == c).sum()) for c in sorted(set(t.meta["category"]))}
    ci = lambda v: f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}]"
    return Verdict(
        "e", f'Clustering by context: "{word}" gets post-attention vectors that separate by the object\'s category '
             "(food / drink / reading) while its q, k, v don't",
        verdict,
        f"layer 0, epoch {last}: holds if the best post-attention silhouette ≥ {SEPARATE} and every q/k/v "
        f"silhouette ≤ {NO_CLUSTER}; partly if only the first, or post-attention beats q/k/v by more than "
        f"{NO_CLUSTER}. Intervals: {n_bootstrap} bootstrap resamples, 95% percentile. Probe: {FOLDS}-fold "
        "logistic regression; control: a random category per object word (Hewitt & Liang 2019); selectivity = "
        "accuracy − control accuracy",
        f"sentences per category {n}; silhouette (cosine) [95% CI]: "
        + ", ".join(f"{kd} {ci(boot[kd]['silhouette'])}" for kd in kinds)
        + f"; {k}-NN purity: " + ", ".join(f"{kd} {ci(boot[kd]['purity'])}" for kd in kinds)
        + "; probe accuracy / control / selectivity: "
        + ", ".join(f"{kd} {p['accuracy']:.2f}/{p['control']:.2f}/{p['selectivity']:+.2f}"
                    for kd, p in probes.items()),
        {kd: {"silhouette": [_r(v) for v in boot[kd]["silhouette"]], "purity": [_r(v) for v in boot[kd]["purity"]],
              "probe": {m: _r(v) for m, v in probes[kd].items()}} for kd in kinds})


# --------------------------------------------------------------------------------------------------------------
# (f) movement during training

def movement(table) -> dict:
    """Per (kind, epoch): mean cosine of each vector to the same vector at the final epoch, and linear CKA
    between that epoch's vectors and the final epoch's (rows matched by identity)."""
    from qkvtrace.project import identity_keys, linear_cka

    last = max(table.meta["epoch"])
    out = {}
    for kind in list(dict.fromkeys(table.meta["kind"].tolist())):
        t = table.where(kind=kind)
        ids = identity_keys(t)
        final = {i: r for r, i in enumerate(ids) if t.meta["epoch"][r] == last}
        X = t.vectors()
        for epoch in sorted(set(t.meta["epoch"].tolist())):
            rows = [r for r in range(len(t)) if t.meta["epoch"][r] == epoch and ids[r] in final]
            A, B = X[rows], X[[final[ids[r]] for r in rows]]
            c = np.mean([cos(a, b) for a, b in zip(A, B)])
            out[(kind, epoch)] = (_r(c), _r(linear_cka(A, B)))
    return out


def verdict_movement(table) -> Verdict:
    """(f) Vectors move during training and settle: similarity to the final checkpoint rises across checkpoints."""
    scores = movement(table)
    epochs = sorted({e for _, e in scores})
    kinds = list(dict.fromkeys(k for k, _ in scores))
    rising = {k: all(scores[(k, a)][0] <= scores[(k, b)][0] + 1e-6 for a, b in zip(epochs, epochs[1:]))
              for k in kinds}
    first = epochs[0]
    order = sorted(kinds, key=lambda k: scores[(k, first)][0])
    return Verdict(
        "f", "Movement during training: every kind's vectors move towards where they end, so earlier checkpoints "
             "are further from the final one",
        _grade(all(rising.values()), any(rising.values())),
        "holds if, for every kind, the mean cosine to the final checkpoint rises from checkpoint to checkpoint",
        f"cosine to final / linear CKA to final at epoch {first}: "
        + ", ".join(f"{k} {scores[(k, first)][0]:.3f}/{scores[(k, first)][1]:.3f}" for k in order)
        + f" (most movement first); rising for {sum(rising.values())} of {len(kinds)} kinds",
        {f"{k} epoch {e}": {"cos_to_final": c, "cka_to_final": cka} for (k, e), (c, cka) in scores.items()})


# --------------------------------------------------------------------------------------------------------------
# (r) relative positions: a finding of models such as T5

def verdict_relative_positions(table, word: str = "eat") -> Verdict:
    """A model with relative positions only (T5: a bias on the attention scores, nothing added to the embeddings)
    gives a word the same layer-0 q, k and v at every position. `table`: encoder.self rows of `word` in two
    sentences where it stands at different positions, kinds q, k, v, layer 0, one epoch."""
    last = max(table.meta["epoch"])
    t = table.where(epoch=last, layer=0, token=word)
    rows = {kind: t.where(kind=kind) for kind in QKV}
    sims = {kind: cos(*(r.where(sentence_id=i).vectors()[0] for i in (0, 1))) for kind, r in rows.items()}
    positions = [int(rows["q"].where(sentence_id=i).meta["position"][0]) for i in (0, 1)]
    return Verdict(
        "r", f'Relative positions (finding): "{word}" at two different positions has the same layer-0 q, k and v, '
             "so positions reach attention only through the score bias",
        "holds" if positions[0] != positions[1] and min(sims.values()) >= IDENTICAL else "does not hold",
        f"holds if the cosine of layer-0 q, k and v between the two positions is ≥ {IDENTICAL}",
        f'"{word}" at word positions {positions[0]} and {positions[1]}, epoch {last}: '
        + ", ".join(f"{k} {c:.6f}" for k, c in sims.items()),
        {k: _r(c, 6) for k, c in sims.items()})


# --------------------------------------------------------------------------------------------------------------
# the registry the experiment file's [[verdicts]] name

@dataclass(frozen=True)
class VerdictType:
    """A verdict an experiment file can declare: what it extracts (`needs`) and how it decides (`decide`)."""
    decide: Callable          # (data, entry) -> list[Verdict]
    needs: Callable           # (entry, n_layers) -> list of selections {sites, kinds, layers, epochs, words}
    params: dict              # parameter -> default (its type is the parameter's type)
    n_sentences: int = 0      # the set must hold exactly this many sentences (0: any)


def _same_position(data, e):
    return [verdict_same_position(data.table(e.sentences, sites=["encoder.self"], kinds=ALL_KINDS,
                                             words=[e.param("word")]), e.param("word"))]


def _decoder_scatter(data, e):
    return [verdict_decoder_scatter(data.table(e.sentences, sites=["encoder.self", "decoder.self"],
                                               kinds=["q", "k", "v", "x1"], layers=[0], epochs=[data.last]))]


def _permutation(data, e):
    tables = {(kind, layer): data.similarity(e.sentences, kind, "decoder.cross", layer, data.last)
              for kind in ("q", "k", "v", "x4", "pattern") for layer in range(data.n_layers)}
    return verdict_permutation(tables, tuple(data.translate(e.sentences, data.last)))


def _five(data, e):
    t = data.table(e.sentences, sites=["encoder.self"], kinds=ALL_KINDS, words=[e.param("word")],
                   epochs=[data.last])
    keep = (t.meta["layer"] == 0) | ((t.meta["kind"] == "layer_out") & (t.meta["layer"] == data.n_layers - 1))
    return [verdict_five_sentences(t.rows(keep), e.param("word"))]


def _clustering(data, e):
    return [verdict_context_clustering(data.table(e.sentences, sites=["encoder.self"], kinds=ALL_KINDS,
                                                  words=[e.param("word")]), e.param("word"), seed=data.seed,
                                       n_bootstrap=e.param("bootstrap"))]


def _movement(data, e):
    return [verdict_movement(data.table(e.sentences, sites=["encoder.self"], kinds=ALL_KINDS,
                                        words=[e.param("word")]))]


def _encoder_word(e, n_layers, epochs=None):
    return [dict(sites=["encoder.self"], kinds=list(ALL_KINDS), layers=None, epochs=epochs, words=[e.param("word")])]


VERDICTS: dict[str, VerdictType] = {
    "same_position": VerdictType(_same_position, _encoder_word, {"word": "eat"}, 2),
    "decoder_scatter": VerdictType(_decoder_scatter, lambda e, n: [dict(
        sites=["encoder.self", "decoder.self"], kinds=["q", "k", "v", "x1"], layers=[0], epochs="last",
        words=None)], {}),
    "permutation": VerdictType(_permutation, lambda e, n: [], {}, 2),
    "five_sentences": VerdictType(_five, lambda e, n: _encoder_word(e, n, "last"), {"word": "eat"}),
    "context_clustering": VerdictType(_clustering, _encoder_word, {"word": "buy", "bootstrap": BOOTSTRAP}),
    "movement": VerdictType(_movement, _encoder_word, {"word": "buy"}),
    "relative_positions": VerdictType(
        lambda data, e: [verdict_relative_positions(data.table(e.sentences, sites=["encoder.self"], kinds=QKV,
                                                               layers=[0], epochs=[data.last],
                                                               words=[e.param("word")]), e.param("word"))],
        lambda e, n: [dict(sites=["encoder.self"], kinds=list(QKV), layers=[0], epochs="last",
                           words=[e.param("word")])], {"word": "eat"}, 2),
}


# --------------------------------------------------------------------------------------------------------------
# the study: the packaged experiment file, for one or more seeds

def study_file() -> Path:
    """The study's experiment file inside the package (experiments/study.toml is the same file)."""
    from qkvtrace.corpus import STUDY_FILE

    return STUDY_FILE


def agreement(by_seed: dict[int, list[Verdict]]) -> list[dict]:
    """Per claim: the verdict of every seed and whether they agree."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    out = []
    for i, v in enumerate(first):
        per = {s: by_seed[s][i].verdict for s in seeds}
        out.append({"key": v.key, "claim": v.claim, "verdicts": per, "agree": len(set(per.values())) == 1})
    return out


def run_study(out: Path | str = "outputs/study", epochs=(1, 15, 30), seeds=(0,), method: str = "pca",
              force: bool = False, retrain: bool = False, cache_root: Path | str | None = None,
              overrides=(), progress: Callable[[str], None] | None = None, train_progress=None) -> dict:
    """Run the study's experiment file into `out` (report.md, index.html, figures/, verdicts.json, ...).

    One model per seed in `seeds` (each run cached); figures come from the first seed, verdicts from every seed.
    `overrides` are `--set KEY=VALUE` items applied to the file (e.g. a tiny model in tests).
    Returns {"out": Path, "verdicts": {seed: [Verdict, ...]}, "agreement": [...], "reused": bool, "seconds": float}.
    """
    from qkvtrace.experiment.run import run_loaded
    from qkvtrace.experiment.schema import load_experiment

    t0 = time.perf_counter()
    epochs, seeds = tuple(epochs), tuple(seeds)
    if not epochs or list(epochs) != sorted(set(epochs)) or epochs[0] < 1:
        raise QkvtraceError(f"{','.join(map(str, epochs))}: expected increasing epochs ≥ 1, e.g. 1,15,30",
                            param="epochs")
    if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= s < 2**32 for s in seeds):
        raise QkvtraceError(f"{','.join(map(str, seeds))}: expected distinct seeds in 0..{2**32 - 1}, e.g. 0,1,2",
                            param="seeds")
    if method not in ("pca", "umap", "tsne"):
        raise QkvtraceError(f"{method!r}: choose pca, umap or tsne", param="method")
    base = [f"train.epochs={max(epochs)}", f"train.checkpoints=[{','.join(map(str, epochs))}]", *overrides]
    exps = {s: load_experiment(study_file(), base + [f"train.seed={s}"]) for s in seeds}
    from dataclasses import replace

    from qkvtrace.experiment.schema import ScatterFigure

    first = exps[seeds[0]]
    first = replace(first, figures=tuple(replace(f, method=method, seed=seeds[0]) if isinstance(f, ScatterFigure)
                                         else f for f in first.figures))
    result = run_loaded(first, Path(out), force, progress, cache_root, retrain=retrain,
                        train_progress=train_progress, more_seeds={s: exps[s] for s in seeds[1:]})
    return dict(result, seconds=time.perf_counter() - t0)


def verdicts_json(by_seed: dict[int, list[Verdict]]) -> dict:
    return {"seeds": list(by_seed), "by_seed": {str(s): [asdict(v) for v in vs] for s, vs in by_seed.items()},
            "agreement": agreement(by_seed)}
