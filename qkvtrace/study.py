"""The word-context clustering study (see README): its figures and tables, and measured verdicts on its claims.

`run_study()` trains the default model on the built-in corpus (or reuses the cached run), extracts the vectors the
study looked at, draws its figures, prints its cosine tables, and decides each claim with a number and a stated
threshold: "holds", "partly" or "does not hold". Verdict functions take VectorTables, so they can be tested alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qkvtrace.errors import QkvtraceError
from qkvtrace.files import atomic_write_json, prepare_out_dir

PAIR = ("we want to eat apple", "we want to eat bread")
PERMUTED = ("we can eat apple", "apple eat can we")
FIVE = ("i can eat apple", "i can eat bread", "i can eat book", "i can eat newspaper", "i can eat apple book")
QKV = ("q", "k", "v")
POST = ("z", "attn_out", "layer_out")
# The study's names for our kinds, used in labels and tables.
STUDY_NAME = {"z": "x1", "attn_out": "x4", "layer_out": "layer_out"}

# Thresholds the verdicts use (stated in every verdict).
IDENTICAL = 0.9999      # cosine at or above: the same vector up to float rounding
SEPARATE = 0.2          # silhouette at or above: vectors separate by category
NO_CLUSTER = 0.05       # silhouette at or below: no separation by category
KEEPS = 0.9             # cosine at or above: a token keeps its k/v at another position


@dataclass
class Verdict:
    claim: str
    verdict: str              # "holds" | "partly" | "does not hold"
    rule: str                 # the threshold and how it was applied
    evidence: str             # the deciding numbers, in words
    numbers: dict = field(default_factory=dict)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _r(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


# --------------------------------------------------------------------------------------------------------------
# verdicts

def verdict_same_position(table, word: str = "eat") -> Verdict:
    """(a) Layer-0 encoder q/k/v of the same token at the same position are identical across two sentences, and the
    post-attention vectors (z, attn_out, layer_out) separate them. `table`: encoder.self rows of `word` in two
    sentences (sentence_id 0 and 1), kinds q, k, v, z, attn_out, layer_out, all layers, several epochs."""
    numbers: dict = {}
    for epoch in sorted(set(table.meta["epoch"].tolist())):
        for layer in sorted(set(table.meta["layer"].tolist())):
            for kind in QKV + POST:
                t = table.where(epoch=epoch, layer=layer, kind=kind, token=word)
                a, b = (t.where(sentence_id=i).vectors()[0] for i in (0, 1))
                numbers[f"epoch {epoch} layer {layer} {kind}"] = _r(_cos(a, b), 6)
    last = max(table.meta["epoch"])
    qkv0 = [numbers[k] for k in numbers if " layer 0 " in k and k.split()[-1] in QKV]
    post0 = {k: numbers[f"epoch {last} layer 0 {k}"] for k in POST}
    identical = min(qkv0) >= IDENTICAL
    separated = [k for k, c in post0.items() if c < IDENTICAL]
    verdict = "holds" if identical and len(separated) == len(POST) else (
        "partly" if identical or separated else "does not hold")
    return Verdict(
        claim=f'Same token, same position: layer-0 encoder q, k, v of "{word}" are identical in the two sentences, '
              "and z (x1), attn_out (x4) and layer_out separate them",
        verdict=verdict,
        rule=f"identical: cosine ≥ {IDENTICAL} for q, k, v at layer 0 at every epoch; separated: cosine < {IDENTICAL}"
             f" for each post-attention kind at layer 0, epoch {last}",
        evidence=f"layer-0 q/k/v cosine min {min(qkv0):.6f}; epoch {last} layer 0: "
                 + ", ".join(f"{STUDY_NAME[k]} {c:.4f}" for k, c in post0.items()),
        numbers=numbers)


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


def verdict_context_clustering(table, word: str = "buy") -> Verdict:
    """(b) Post-attention vectors of `word` separate by the object's category while its q/k/v don't.
    `table`: encoder.self rows of `word` across many sentences, with a `category` column."""
    scores = cluster_scores(table)
    last = max(e for e, _, _ in scores)
    sil = {kind: s for (e, layer, kind), (s, _) in scores.items() if e == last and layer == 0}
    pur = {kind: p for (e, layer, kind), (_, p) in scores.items() if e == last and layer == 0}
    qkv_max = max(sil[k] for k in QKV)
    post_max_kind = max(POST, key=lambda k: sil[k])
    post_max = sil[post_max_kind]
    if post_max >= SEPARATE and qkv_max <= NO_CLUSTER:
        verdict = "holds"
    elif post_max >= SEPARATE or (post_max > qkv_max + NO_CLUSTER):
        verdict = "partly"
    else:
        verdict = "does not hold"
    n = {c: int((table.where(epoch=last, layer=0, kind="q").meta["category"] == c).sum())
         for c in sorted(set(table.meta["category"]))}
    deeper = {k: v for k, v in scores.items() if k[1] > 0 and k[0] == last}
    deeper_txt = "; ".join(f"layer {l} {STUDY_NAME.get(kd, kd)} {s:+.2f}" for (e, l, kd), (s, p) in deeper.items())
    return Verdict(
        claim=f'Clustering by context: "{word}" gets post-attention vectors that separate by the object\'s category '
              "(food / drink / reading) while its q, k, v don't",
        verdict=verdict,
        rule=f"layer 0, epoch {last}: holds if the best post-attention silhouette ≥ {SEPARATE} and every q/k/v "
             f"silhouette ≤ {NO_CLUSTER}; partly if only one side of that holds or post-attention beats q/k/v by "
             f"more than {NO_CLUSTER}",
        evidence=f"sentences per category {n}; silhouette (cosine) at layer 0: "
                 + ", ".join(f"{STUDY_NAME.get(k, k)} {sil[k]:+.3f}" for k in QKV + POST)
                 + "; 5-NN purity: " + ", ".join(f"{STUDY_NAME.get(k, k)} {pur[k]:.2f}" for k in QKV + POST)
                 + (f"; deeper layers (q/k/v there already carry context): {deeper_txt}" if deeper_txt else ""),
        numbers={f"epoch {e} layer {l} {kd}": {"silhouette": s, "purity": p} for (e, l, kd), (s, p) in scores.items()})


def verdict_permutation(tables: dict, translations: dict) -> Verdict:
    """(c) The same token at a different position keeps its k and v. `tables`: {(site, kind, layer):
    SimilarityTable} for the two permuted sentences; `translations`: {sentence: text} at the final epoch."""
    def same_token(t):
        vals = [t.matrix[i, t.cols.index(r)] for i, r in enumerate(t.rows) if r in t.cols]
        return float(np.mean(vals)), float(np.min(vals))
    kv = {kind: same_token(tables[("encoder.self", kind, 0)]) for kind in ("k", "v")}
    out_mean, out_min = same_token(tables[("encoder.self", "layer_out", "last")])
    a, b = PERMUTED
    same_translation = translations[a] == translations[b]
    keeps = all(m >= KEEPS for m, _ in kv.values())
    verdict = "holds" if keeps and same_translation else ("partly" if keeps or same_translation else "does not hold")
    return Verdict(
        claim=f'Permutation: in "{a}" vs "{b}" the same word keeps its k and v at another position; the encoder '
              "output stays close and the translation stays the same",
        verdict=verdict,
        rule=f"holds if the same-word cosine of layer-0 encoder k and v averages ≥ {KEEPS} and the two translations "
             "are equal; partly if one of the two",
        evidence=f"same-word cosine, layer-0 k mean {kv['k'][0]:.3f} (min {kv['k'][1]:.3f}), v mean {kv['v'][0]:.3f} "
                 f"(min {kv['v'][1]:.3f}); encoder output (src_final) same-word mean {out_mean:.3f} (min "
                 f"{out_min:.3f}); translations: \"{translations[a]}\" vs \"{translations[b]}\"",
        numbers={"k_mean": _r(kv["k"][0]), "k_min": _r(kv["k"][1]), "v_mean": _r(kv["v"][0]), "v_min": _r(kv["v"][1]),
                 "src_final_mean": _r(out_mean), "src_final_min": _r(out_min), "same_translation": same_translation})


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
            cos = np.mean([_cos(a, b) for a, b in zip(A, B)])
            out[(kind, epoch)] = (_r(cos), _r(linear_cka(A, B)))
    return out


def verdict_movement(table) -> Verdict:
    """(d) Vectors move during training and settle: similarity to the final checkpoint rises across checkpoints."""
    scores = movement(table)
    epochs = sorted({e for _, e in scores})
    kinds = list(dict.fromkeys(k for k, _ in scores))
    rising = {k: all(scores[(k, a)][0] <= scores[(k, b)][0] + 1e-6 for a, b in zip(epochs, epochs[1:]))
              for k in kinds}
    first = epochs[0]
    order = sorted(kinds, key=lambda k: scores[(k, first)][0])
    verdict = "holds" if all(rising.values()) else ("partly" if any(rising.values()) else "does not hold")
    return Verdict(
        claim="Movement during training: every kind's vectors move towards where they end, so earlier checkpoints "
              "are further from the final one",
        verdict=verdict,
        rule="holds if, for every kind, the mean cosine to the final checkpoint rises from checkpoint to checkpoint",
        evidence="cosine to final / linear CKA to final at epoch " + str(first) + ": "
                 + ", ".join(f"{STUDY_NAME.get(k, k)} {scores[(k, first)][0]:.3f}/{scores[(k, first)][1]:.3f}"
                             for k in order)
                 + f" (most movement first); rising for {sum(rising.values())} of {len(kinds)} kinds",
        numbers={f"{k} epoch {e}": {"cos_to_final": c, "cka_to_final": cka} for (k, e), (c, cka) in scores.items()})


# --------------------------------------------------------------------------------------------------------------
# sentence sets

def context_sentences(word: str = "buy", per_category: int = 30, seed: int = 0) -> list[str]:
    """Built-in sentences with the verb `word`, `per_category` per object category (seeded sample)."""
    import random

    from qkvtrace.corpus import builtin_corpus

    c = builtin_corpus(seed=0)
    by_cat: dict[str, list[str]] = {}
    for p in c.train + c.val:
        if p.meta.get("verb") == word:
            by_cat.setdefault(p.meta["category"], []).append(p.src)
    rng = random.Random(seed)
    out = []
    for cat in sorted(by_cat):
        pool = sorted(set(by_cat[cat]))
        out += rng.sample(pool, min(per_category, len(pool)))
    if len({c for c in by_cat}) < 2:
        raise QkvtraceError(f'the built-in corpus has "{word}" in fewer than two categories')
    return out


# --------------------------------------------------------------------------------------------------------------
# the whole study

def run_study(out: Path | str = "outputs/study", epochs=(1, 15, 30), seed: int = 0, method: str = "pca",
              force: bool = False, retrain: bool = False, cache_root: Path | str | None = None,
              progress: Callable[[str], None] | None = None, train_progress=None, model=None) -> dict:
    """Reproduce the study into `out` (report.md, index.html, figures/, tables/, verdicts.json).

    `model` (a ModelConfig) replaces the default model, e.g. a tiny one in tests.
    Returns {"out": Path, "verdicts": [Verdict, ...], "reused": bool, "seconds": float}.
    """
    from qkvtrace.compare import similarity, write_similarity, attention
    from qkvtrace.config import ModelConfig, TrainConfig
    from qkvtrace.extract import extract
    from qkvtrace.plot import plot_table
    from qkvtrace.report import Item, Section, write_report
    from qkvtrace.train import read_metrics, train_or_reuse

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    epochs = tuple(epochs)
    if list(epochs) != sorted(set(epochs)) or epochs[0] < 1:
        raise QkvtraceError(f"--epochs {','.join(map(str, epochs))}: expected increasing epochs ≥ 1, e.g. 1,15,30")
    if method not in ("pca", "umap", "tsne"):
        raise QkvtraceError(f"--method {method!r}: choose pca, umap or tsne")
    out = Path(out)
    prepare_out_dir(out, force)
    figs, tabs = out / "figures", out / "tables"
    figs.mkdir(exist_ok=True)
    tabs.mkdir(exist_ok=True)

    model_cfg, train_cfg = model or ModelConfig(), TrainConfig(epochs=max(epochs), checkpoints=epochs, seed=seed)
    say("training the default model on the built-in corpus (or reusing it)")
    run, reused = train_or_reuse(model_cfg, train_cfg, cache_root, retrain=retrain, progress=train_progress)
    say(("reused" if reused else "trained") + f" run {run.path}")
    last = epochs[-1]
    n_layers = run.model_cfg.n_layers
    sections: list[Section] = []
    verdicts: list[Verdict] = []

    metrics = {m["epoch"]: m for m in read_metrics(run.path)}
    rows = "\n".join(f"| {e} | {metrics[e]['val_loss']:.4f} | {metrics[e]['val_token_acc']:.3f} | "
                     f"{metrics[e]['val_exact_match']:.3f} | {metrics[e]['val_bleu']:.1f} |" for e in epochs)
    sections.append(Section("Model and training", text=(
        f"Model (d_model {model_cfg.d_model}, {model_cfg.n_layers} layers, {model_cfg.n_heads} heads, d_ff "
        f"{model_cfg.d_ff}) trained {max(epochs)} epochs on the built-in corpus with seed {seed}; checkpoints at "
        f"epochs {', '.join(map(str, epochs))}. Run directory: `{run.path}` ({'reused' if reused else 'trained now'})."),
        items=[Item("Validation metrics at each checkpoint", markdown=(
            "| epoch | val loss | token acc | exact match | BLEU |\n|---:|---:|---:|---:|---:|\n" + rows + "\n"))]))

    def scatter(table, name, caption, dims=2, **kw):
        # The PNG and, from the same projection, its interactive version (hover cards, epoch slider).
        png, page = plot_table(table, [figs / f"{name}.png", figs / f"{name}.html"], method=method, dims=dims,
                               seed=seed, plotlyjs="directory", **kw)
        return [Item(caption, png), Item(caption + " (interactive: hover, legend, epoch slider)", page)]

    # 1. "eat" in the two sentences, encoder
    say("1/5 encoder vectors of \"eat\"")
    enc = extract(run, list(PAIR), epochs=epochs, sites="encoder.self")
    eat = enc.where(token="eat", layer=0, kind=["q", "k", "v", "z"])
    eat.meta["kind"] = np.array([STUDY_NAME.get(k, k) for k in eat.meta["kind"]], dtype=object)
    items = scatter(eat, "1-encoder-eat-3d", "Encoder layer 0: q, k, v and x1 of \"eat\" at epochs "
                    f"{', '.join(map(str, epochs))}, one {method.upper()} frame, coloured by sentence, with trajectories",
                    dims=3, trajectories=True)
    items += scatter(eat, "1-encoder-eat-2d", "The same in 2-D", trajectories=True)
    verdicts.append(verdict_same_position(enc.where(token="eat")))
    sections.append(Section(f"1. \"eat\" in \"{PAIR[0]}\" vs \"{PAIR[1]}\" (encoder)", text=(
        "At layer 0, q, k and v of a token depend only on the token and its position, so the two sentences give "
        "the same q/k/v for \"eat\" (the points coincide); x1 mixes in the other tokens and differs."), items=items))

    # 2. decoder side
    say("2/5 decoder vectors")
    dec = extract(run, list(PAIR), epochs=epochs, sites="decoder.self,decoder.cross", kinds="q,k,v,z", layers="0")
    dec.meta["kind"] = np.array([STUDY_NAME.get(k, k) for k in dec.meta["kind"]], dtype=object)
    items = []
    for site in ("decoder.self", "decoder.cross"):
        items += scatter(dec.where(site=site), f"2-{site.replace('.', '-')}",
                         f"{site}, layer 0: q, k, v, x1 of every token of both sentences; decoder tokens are named by "
                         "their transition (sos->wir); cross-attention k and v are source tokens",
                         trajectories=True, label_mode="ends", facet="kind")
    spread = {}
    for site in ("encoder.self", "decoder.self"):
        t = (enc if site == "encoder.self" else dec).where(site=site, layer=0, epoch=last,
                                                           kind=["q", "k", "v"])
        X = t.vectors()
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        spread[site] = _r(1 - float(np.mean(Xn @ Xn.T)))
    sections.append(Section("2. Decoder self- and cross-attention", text=(
        f"Spread of layer-0 q/k/v (mean cosine distance between all vectors, epoch {last}): encoder "
        f"{spread['encoder.self']:.3f}, decoder self-attention {spread['decoder.self']:.3f}."), items=items))

    # 3. permutation
    say("3/5 permutation tables")
    a, b = PERMUTED
    specs = [("decoder.self", "q", 0), ("decoder.cross", "k", 0), ("decoder.cross", "v", 0),
             ("decoder.cross", "attn_out", 0), ("decoder.cross", "pattern", 0), ("encoder.self", "k", 0),
             ("encoder.self", "v", 0), ("encoder.self", "layer_out", n_layers - 1)]
    perm_tables, items = {}, []
    for site, kind, layer in specs:
        t = similarity(run, a, b, kind=kind, site=site, layer=layer, epochs=[last])[0]
        write_similarity([t], tabs)
        perm_tables[(site, kind, layer if kind != "layer_out" else "last")] = t
        shown = STUDY_NAME.get(kind, kind)
        items.append(Item(f"{site} {shown} (layer {layer}), epoch {last}: rows \"{a}\", columns \"{b}\"",
                          tabs / f"{t.stem}.png", markdown=t.markdown()))
    translations = {s: tr.text for s, tr in zip(PERMUTED, run.translate(list(PERMUTED), last))}
    for s in PERMUTED:
        pats = attention(run, s, epochs=list(epochs), site="decoder.cross", layer=0)
        name = "3-attention-" + s.replace(" ", "-")
        caption = f"Cross-attention of \"{s}\" at epochs {', '.join(map(str, epochs))} (one colour scale)"
        items.append(Item(caption, pats.save(figs / f"{name}.png")))
        items.append(Item(caption + " (interactive: hover a cell)", pats.save(figs / f"{name}.html",
                                                                             plotlyjs="directory")))
    verdicts.append(verdict_permutation(perm_tables, translations))
    sections.append(Section(f"3. Permutation: \"{a}\" vs \"{b}\"", text=(
        f"Translations at epoch {last}: \"{translations[a]}\" / \"{translations[b]}\". The same word's cosine is on "
        "the reverse diagonal of the k and v tables."), items=items))

    # 4. five sentences
    say("4/5 five sentences")
    tr_rows = []
    for s in FIVE:
        tr_rows.append(f"| {s} | " + " | ".join(" ".join(t.tokens) for t in
                                                  (run.translate([s], e)[0] for e in epochs)) + " |")
    five = extract(run, list(FIVE), words="eat", epochs=epochs, sites="encoder.self")
    five_fig = five.where(layer=0, kind=["q", "k", "v", "z", "attn_out"])
    final = five.where(layer=n_layers - 1, kind="layer_out")
    final.meta["kind"] = np.full(len(final), "src_final", dtype=object)
    from qkvtrace.table import VectorTable
    joined = VectorTable({c: np.concatenate([five_fig.meta[c], final.meta[c]]) for c in five_fig.meta},
                         np.concatenate([five_fig.X, final.X]))
    joined.meta["kind"] = np.array([STUDY_NAME.get(k, k) for k in joined.meta["kind"]], dtype=object)
    items = [Item("Greedy translations at each checkpoint", markdown=(
        "| sentence | " + " | ".join(f"epoch {e}" for e in epochs) + " |\n|---|" + "---|" * len(epochs) + "\n"
        + "\n".join(tr_rows) + "\n"))]
    items += scatter(joined.where(epoch=last), "4-five-sentences-eat",
                     f"\"eat\" in the five sentences at epoch {last}: encoder layer-0 q, k, v, x1, x4 and src_final, "
                     "coloured by sentence", color_by="sentence")
    spread5 = {}
    for kind in ("q", "k", "v", "x1", "x4", "src_final"):
        X = joined.where(epoch=last, kind=kind).vectors()
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        iu = np.triu_indices(len(Xn), 1)
        spread5[kind] = _r(float(np.mean((Xn @ Xn.T)[iu])))
    sections.append(Section("4. Five sentences, two meaningful and three nonsense", text=(
        f"Mean cosine between the five sentences' \"eat\" vectors at epoch {last}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in spread5.items())
        + ". q, k, v are identical (same token, same position, layer 0); x1, x4 and src_final differ."), items=items))

    # 5. clustering by context and movement
    say("5/5 clustering by context and movement")
    ctx_sents = context_sentences("buy", 30, seed)
    ctx = extract(run, ctx_sents, words="buy", epochs=epochs, sites="encoder.self", patterns=False)
    verdicts.insert(1, verdict_context_clustering(ctx, "buy"))
    ctx_fig = ctx.where(epoch=last, layer=0)
    ctx_fig.meta["kind"] = np.array([STUDY_NAME.get(k, k) for k in ctx_fig.meta["kind"]], dtype=object)
    items = []
    for kind in ("q", "x1", "x4"):  # each kind in its own frame: the separation within a kind is the question
        items += scatter(ctx_fig.where(kind=kind), f"5-context-buy-{kind}",
                         f"\"buy\" in {len(ctx_sents)} sentences at epoch {last}, encoder layer 0, {kind}, coloured by "
                         "the object's category", color_by="category", label_mode="none")
    scores = cluster_scores(ctx)
    table_md = ("| epoch | layer | " + " | ".join(STUDY_NAME.get(k, k) for k in QKV + POST) + " |\n|---:|---:|"
                + "---:|" * 6 + "\n")
    for e in epochs:
        for layer in range(n_layers):
            table_md += f"| {e} | {layer} | " + " | ".join(
                f"{scores[(e, layer, k)][0]:+.2f} / {scores[(e, layer, k)][1]:.2f}" for k in QKV + POST) + " |\n"
    items.append(Item("Silhouette (cosine) / 5-NN purity of \"buy\" grouped by object category", markdown=table_md))
    verdicts.append(verdict_movement(ctx))
    mv = movement(ctx)
    mv_md = "| kind | " + " | ".join(f"epoch {e}" for e in epochs) + " |\n|---|" + "---:|" * len(epochs) + "\n"
    for kind in dict.fromkeys(k for k, _ in mv):
        mv_md += f"| {STUDY_NAME.get(kind, kind)} | " + " | ".join(f"{mv[(kind, e)][0]:.3f} / {mv[(kind, e)][1]:.3f}"
                                                                  for e in epochs) + " |\n"
    items.append(Item(f"Movement: mean cosine / linear CKA to the final checkpoint, \"buy\" in {len(ctx_sents)} "
                      "sentences, all encoder layers", markdown=mv_md))
    sections.append(Section("5. Clustering by context, and movement during training", items=items))

    verdict_md = "| claim | verdict | evidence | rule |\n|---|---|---|---|\n" + "".join(
        f"| {v.claim} | **{v.verdict}** | {v.evidence} | {v.rule} |\n" for v in verdicts)
    sections.insert(0, Section("Verdicts", items=[Item("Each claim, decided by the numbers", markdown=verdict_md)]))
    atomic_write_json(out / "verdicts.json", {"epochs": list(epochs), "seed": seed, "method": method,
                                              "run": str(run.path), "verdicts": [asdict(v) for v in verdicts]})
    write_report(out, "qkvtrace study: what Q, K and V are", sections, intro=(
        "Reproduces the word-context clustering study: do Q, K, V cluster while the post-attention vectors separate "
        "by context? Every claim below is decided by a number and a stated threshold."))
    seconds = time.perf_counter() - t0
    say(f"wrote {out / 'report.md'} and {out / 'index.html'} in {seconds:.1f} s")
    return {"out": out, "verdicts": verdicts, "reused": reused, "seconds": seconds}
