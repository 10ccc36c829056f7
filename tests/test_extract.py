import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkvtrace.errors import QkvtraceError
from qkvtrace.extract import capture, extract, read_sentences
from qkvtrace.table import load_vectors
from qkvtrace.train import pad, read_safetensors

SENTS = ["we want to eat apple", "we want to eat bread"]


def weights(run, epoch):
    return read_safetensors(run.path / "checkpoints" / f"epoch-{epoch:03d}.safetensors")[0]


def rows(table, **where):
    t = table.where(**where)
    order = np.argsort(t.meta["position"], kind="stable")
    return t.rows(order)


def test_encoder_layer0_vectors_equal_hand_computation(tiny_run):
    epoch = 4
    table = extract(tiny_run, SENTS[:1], epochs=[epoch], sites="encoder.self", layers="0", specials=True)
    w = weights(tiny_run, epoch)
    cfg = tiny_run.model_cfg
    ids = torch.tensor(tiny_run.src_vocab.encode(SENTS[0]))
    x = w["encoder.embed.tok.weight"][ids] * math.sqrt(cfg.d_model) + w["encoder.embed.pos.weight"][: len(ids)]
    proj = {k: x @ w[f"encoder.layers.0.self_attn.{k}_proj.weight"].T + w[f"encoder.layers.0.self_attn.{k}_proj.bias"]
            for k in "qkv"}
    for kind in "qkv":
        got = rows(table, kind=kind).vectors()
        assert got.shape == (len(ids), cfg.d_model)
        np.testing.assert_allclose(got, proj[kind].numpy(), atol=1e-5)
    H, D = cfg.n_heads, cfg.d_head
    q, k, v = (proj[c].view(len(ids), H, D).transpose(0, 1) for c in "qkv")  # (head, pos, d_head)
    z = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v  # (head, pos, d_head)
    z = z.transpose(0, 1).reshape(len(ids), cfg.d_model)
    np.testing.assert_allclose(rows(table, kind="z").vectors(), z.numpy(), atol=1e-5)
    out = z @ w["encoder.layers.0.self_attn.out_proj.weight"].T + w["encoder.layers.0.self_attn.out_proj.bias"]
    np.testing.assert_allclose(rows(table, kind="attn_out").vectors(), out.numpy(), atol=1e-5)


def test_attention_matches_torch_multi_head_attention_forward(tiny_run):
    attn = tiny_run.model(4).decoder.layers[0].cross_attn
    g = torch.Generator().manual_seed(0)
    x, mem = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    key_keep = torch.ones(3, 7, dtype=torch.bool)
    key_keep[1, 4:] = False
    ours = attn(x, mem, key_keep[:, None, None, :])
    ref, _ = F.multi_head_attention_forward(
        x.transpose(0, 1), mem.transpose(0, 1), mem.transpose(0, 1), 16, attn.n_heads, None,
        torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, training=False, key_padding_mask=~key_keep,
        need_weights=False, use_separate_proj_weight=True, q_proj_weight=attn.q_proj.weight,
        k_proj_weight=attn.k_proj.weight, v_proj_weight=attn.v_proj.weight)
    torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_capture_changes_no_output_bit_and_removes_hooks(tiny_run):
    model = tiny_run.model(4)
    src = pad([tiny_run.src_vocab.encode(s) for s in SENTS])
    tgt = pad([[1, 5, 6, 7]] * 2)
    with torch.no_grad():
        plain = model(src, tgt)
        names = model.hook_names()
        with capture(model, names) as cache:
            hooked = model(src, tgt)
        assert set(cache) == set(names)
        assert torch.equal(plain, hooked)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, names):
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


def test_alone_and_batched_give_same_vectors_without_padding_rows(tiny_run):
    mixed = ["i eat bread", "we want to read newspaper", "i can eat apple"]
    together = extract(tiny_run, mixed, epochs=[4])
    alone = extract(tiny_run, mixed[:1], epochs=[4])
    sub = together.where(sentence_id=0)
    assert len(sub) == len(alone)
    assert "<pad>" not in set(together.meta["token"])
    for col in ("site", "kind", "position", "side", "layer"):
        assert (sub.meta[col] == alone.meta[col]).all()
    np.testing.assert_allclose(sub.vectors(), alone.vectors(), atol=1e-5)


def test_layer0_encoder_qkv_identical_across_sentences(tiny_run):
    t = extract(tiny_run, SENTS, words="eat", epochs=[4], sites="encoder.self", layers="0")
    for kind in "qkv":
        a, b = (t.where(kind=kind, sentence_id=i).vectors() for i in (0, 1))
        assert np.array_equal(a, b)
    za, zb = (t.where(kind="z", sentence_id=i).vectors() for i in (0, 1))
    assert not np.allclose(za, zb)


def test_rows_sides_labels_and_transitions(tiny_run):
    t = extract(tiny_run, [("we want to eat apple", "wir wollen apfel essen")], epochs=[2],
                sites="decoder.cross", kinds="q,k,x1", label="{word}@{kind}@{epoch}")
    k = t.where(kind="k")
    assert set(k.meta["side"]) == {"src"} and "eat@k@2" in set(k.meta["label"])
    q = t.where(kind="q")
    assert set(q.meta["side"]) == {"tgt"}
    assert list(q.meta["token"][:5]) == ["<sos>", "wir", "wollen", "apfel", "essen"]
    assert all(tr.startswith("sos->") for tr in q.where(position=0).meta["transition"])
    assert set(t.where(kind="x1").meta["kind"]) == {"x1"}
    assert t.patterns and np.asarray(t.patterns[0]["pattern"]).shape[1:] == (5, 7)


def test_heads_per_head_widths(tiny_run):
    t = extract(tiny_run, SENTS[:1], epochs=[4], sites="encoder.self", kinds="q", heads="concat,all")
    full = t.where(head="concat").vectors()
    parts = [t.where(head=str(h)).vectors() for h in range(tiny_run.model_cfg.n_heads)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)


def test_streaming_in_small_chunks_equals_in_memory(tmp_path, tiny_run):
    mem = extract(tiny_run, SENTS + ["i read book"], epochs=[1, 4], batch_size=1)
    disk = extract(tiny_run, SENTS + ["i read book"], epochs=[1, 4], out=tmp_path / "v", max_memory_mb=0.001,
                   batch_size=1)
    back = load_vectors(tmp_path / "v")
    assert len(back) == len(mem) == len(disk)
    np.testing.assert_array_equal(np.asarray(back.X), mem.X)
    assert list(back.meta["label"]) == list(mem.meta["label"])
    assert len(back.patterns) == len(mem.patterns)
    assert np.load(tmp_path / "v" / "X.npy").shape == mem.X.shape  # readable without qkvtrace
    half = extract(tiny_run, SENTS, epochs=[4], out=tmp_path / "h", dtype="float16")
    assert np.load(tmp_path / "h" / "X.npy").dtype == np.float16 and len(half)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(words="zebra"), "words 'zebra': not in the vocabulary; closest:"),
    (dict(words="beer"), "words beer: occurs in none of the given sentences"),
    (dict(epochs=[3]), "epochs 3: "),
    (dict(kinds="q,w"), "kinds 'w': unknown; valid: q, k, v, z, attn_out, layer_out, x1, x4"),
    (dict(sites="encoder.cross"), "sites 'encoder.cross': unknown; valid: encoder.self, decoder.self, decoder.cross"),
    (dict(layers="3"), "layers '3': unknown; valid: all, 0"),
    (dict(heads="5"), "heads '5': unknown; valid: concat, all, 0, 1"),
    (dict(max_memory_mb=-1), "max_memory_mb -1: expected a positive number"),
    (dict(format="projector"), "format projector: needs an output directory (out)"),
])
def test_bad_selection_is_one_error_naming_the_parameter(tiny_run, kwargs, needle):
    """The library names its parameters (the CLI maps them to options), never an option the caller did not use."""
    with pytest.raises(QkvtraceError) as e:
        extract(tiny_run, SENTS, **kwargs)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value) and "--" not in str(e.value)
    assert e.value.param == next(iter(kwargs))


def test_selection_is_one_validated_value(tiny_run):
    from qkvtrace.extract import Selection
    from qkvtrace.sources import RunSource

    sel = Selection(sites="encoder.self", kinds="q,x1,q", layers=0, heads="all", words="Eat")
    assert (sel.sites, sel.kinds, sel.layers, sel.heads, sel.words) == (("encoder.self",), ("q", "x1"), (0,),
                                                                         ("all",), ("eat",))
    resolved = sel.resolve(RunSource(tiny_run))
    assert resolved.heads == ("0", "1") and resolved.epochs == (1, 2, 4) and resolved.base_kinds == ("q", "z")
    with pytest.raises(QkvtraceError) as e:
        Selection(layers="x")
    assert e.value.param == "layers" and str(e.value).startswith("layers 'x': expected all or whole numbers")
    by_value = extract(tiny_run, SENTS[:1], sel)
    by_name = extract(tiny_run, SENTS[:1], sites="encoder.self", kinds="q,x1", layers=0, heads="all", words="eat")
    np.testing.assert_array_equal(by_value.X, by_name.X)
    with pytest.raises(TypeError, match="not both"):
        extract(tiny_run, SENTS[:1], sel, kinds="q")


def test_sentence_file_errors(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("we eat apple\n\ni read book\n")
    with pytest.raises(QkvtraceError, match=r"s.txt:2: empty sentence"):
        read_sentences(f)
    f.write_text("")
    with pytest.raises(QkvtraceError, match="empty"):
        read_sentences(f)
    f.write_text("we eat apple\twir essen apfel\ni read book\n")
    s = read_sentences(f)
    assert s[0].tgt == "wir essen apfel" and s[1].tgt is None


def test_cli_extract_refuses_existing_out_and_keeps_it(tmp_path, tiny_run, qkvtrace_cli):
    out = tmp_path / "v"
    cmd = ["extract", str(tiny_run.path), "-s", SENTS[0], "--out", str(out), "--format", "projector"]
    r = qkvtrace_cli(*cmd)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {len(load_vectors(out))} vectors (16 wide, float32) to {out}\n"
    header = (out / "metadata.tsv").read_text().splitlines()[0].split("\t")
    assert header[:3] == ["epoch", "sentence_id", "sentence"]
    n_vec = len((out / "vectors.tsv").read_text().splitlines())
    assert n_vec == len(load_vectors(out))
    before = (out / "X.npy").read_bytes()
    r = qkvtrace_cli(*cmd)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "X.npy").read_bytes() == before


def test_decoder_self_and_cross_attention_equal_hand_computation_with_masks(tiny_run):
    # Two sentences of different lengths in one batch: the shorter one's source is padded, so cross-attention runs
    # with a padding mask, and decoder self-attention with the causal mask; both must match softmax(qkᵀ/√d + mask)·v.
    epoch, pairs = 4, [("we want to eat apple", "wir wollen apfel essen"), ("i eat bread", "ich esse brot")]
    w = weights(tiny_run, epoch)
    cfg = tiny_run.model_cfg
    H, D = cfg.n_heads, cfg.d_head
    dec = extract(tiny_run, pairs, epochs=[epoch], sites="decoder.self,decoder.cross", layers="0",
                  kinds="q,k,v,z,attn_out", specials=True)
    enc = extract(tiny_run, pairs, epochs=[epoch], sites="encoder.self", kinds="layer_out", specials=True)

    def lin(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def attend(q, k, v, causal):
        q, k, v = (t.view(len(t), H, D).transpose(0, 1) for t in (q, k, v))  # (head, pos, d_head)
        scores = q @ k.transpose(1, 2) / math.sqrt(D)  # (head, query_pos, key_pos)
        if causal:
            scores = scores.masked_fill(~torch.ones(scores.shape[1:], dtype=torch.bool).tril(), float("-inf"))
        return (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(q.shape[1], H * D)  # (query_pos, d_model)

    def got(site, kind, j):
        return rows(dec, site=site, kind=kind, sentence_id=j).vectors()

    for j, (_, tgt) in enumerate(pairs):
        ids = torch.tensor(tiny_run.tgt_vocab.encode(tgt)[:-1])  # decoder input: <sos> + target, no <eos>
        x = w["decoder.embed.tok.weight"][ids] * math.sqrt(cfg.d_model) + w["decoder.embed.pos.weight"][: len(ids)]
        a = "decoder.layers.0.self_attn"
        q, k, v = (lin(x, f"{a}.{c}_proj") for c in "qkv")
        z = attend(q, k, v, causal=True)
        out = lin(z, f"{a}.out_proj")
        for kind, want in (("q", q), ("k", k), ("v", v), ("z", z), ("attn_out", out)):
            np.testing.assert_allclose(got("decoder.self", kind, j), want.numpy(), atol=1e-5, err_msg=kind)
        y = F.layer_norm(x + out, (cfg.d_model,), w["decoder.layers.0.self_attn_norm.weight"],
                         w["decoder.layers.0.self_attn_norm.bias"])
        memory = torch.from_numpy(rows(enc, sentence_id=j).vectors())  # (src_pos, d_model), real positions only
        a = "decoder.layers.0.cross_attn"
        q, k, v = lin(y, f"{a}.q_proj"), lin(memory, f"{a}.k_proj"), lin(memory, f"{a}.v_proj")
        z = attend(q, k, v, causal=False)
        for kind, want in (("q", q), ("k", k), ("v", v), ("z", z), ("attn_out", lin(z, f"{a}.out_proj"))):
            np.testing.assert_allclose(got("decoder.cross", kind, j), want.numpy(), atol=1e-5, err_msg=kind)
    assert set(rows(dec, site="decoder.cross", kind="k").meta["side"]) == {"src"}


def test_causal_self_attention_matches_torch_multi_head_attention_forward(tiny_run):
    attn = tiny_run.model(4).decoder.layers[0].self_attn
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    ours = attn(x, x, None, causal=True)
    ref, _ = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 16, attn.n_heads, None,
        torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False,
        attn_mask=~torch.ones(5, 5, dtype=torch.bool).tril(), use_separate_proj_weight=True,
        q_proj_weight=attn.q_proj.weight, k_proj_weight=attn.k_proj.weight, v_proj_weight=attn.v_proj.weight)
    torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_hooks_removed_when_the_forward_pass_fails(tiny_run):
    model = tiny_run.model(4)
    src = pad([tiny_run.src_vocab.encode(SENTS[0])])
    with pytest.raises(IndexError):
        with torch.no_grad(), capture(model, model.hook_names()):
            model(src, torch.tensor([[1, 10**6]]))  # an id past the vocabulary fails inside the forward
    assert not any(m._forward_hooks for m in model.modules())


def test_failed_force_extraction_keeps_the_existing_table(tmp_path, tiny_run):
    out = tmp_path / "v"
    extract(tiny_run, SENTS, words="eat", epochs=[4], out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(QkvtraceError, match="occurs in none"):
        extract(tiny_run, SENTS, words="beer", epochs=[4], out=out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(QkvtraceError, match="occurs in none"):
        extract(tiny_run, SENTS, words="beer", epochs=[4], out=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_force_replaces_patterns_and_projector_files_instead_of_appending(tmp_path, tiny_run):
    out = tmp_path / "v"
    first = extract(tiny_run, SENTS, epochs=[4], kinds="q", out=out, format="projector")
    assert len((out / "vectors.tsv").read_text().splitlines()) == len(first)
    again = extract(tiny_run, SENTS[:1], epochs=[4], kinds="q", out=out, force=True)
    assert len(again.patterns) == len(load_vectors(out).patterns) == len(first.patterns) // 2
    assert not (out / "vectors.tsv").exists() and not (out / "metadata.tsv").exists()


def test_repeated_selections_give_no_duplicate_rows(tiny_run):
    once = extract(tiny_run, SENTS, words="eat", epochs=[4], sites="encoder.self", kinds="q", layers="0")
    twice = extract(tiny_run, SENTS, words="eat", epochs=[4, 4], sites="encoder.self,encoder.self", kinds="q,q",
                    layers="0,0")
    assert len(twice) == len(once) == 2


def test_word_on_a_side_the_selection_does_not_reach_is_an_error(tiny_run):
    pair = [("we want to eat apple", "wir wollen apfel essen")]
    with pytest.raises(QkvtraceError, match="words eat: occurs only on the source side") as e:
        extract(tiny_run, pair, words="eat,wir", epochs=[4], sites="decoder.self")
    assert "\n" not in str(e.value)
    with pytest.raises(QkvtraceError, match="words wir: occurs only on the target side"):
        extract(tiny_run, pair, words="wir", epochs=[4], sites="decoder.cross", kinds="k,v")
    t = extract(tiny_run, pair, words="eat,wir", epochs=[4], sites="decoder.cross", kinds="q,k")
    assert set(t.where(kind="k").meta["token"]) == {"eat"} and set(t.where(kind="q").meta["token"]) == {"wir"}


def test_target_longer_than_the_model_holds_is_one_error(tmp_path, tiny_run):
    long = " ".join(["wir"] * tiny_run.model_cfg.max_len)
    with pytest.raises(QkvtraceError, match="the model holds at most"):
        extract(tiny_run, [("we eat", long)], epochs=[4], out=tmp_path / "v")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("label", ["{word:d}", "{word.upper}", "{0}", "{word"])
def test_label_template_that_cannot_format_a_row_is_one_error(label, tiny_run):
    with pytest.raises(QkvtraceError, match="^label ") as e:
        extract(tiny_run, SENTS, epochs=[4], label=label)
    assert "\n" not in str(e.value)


def test_typed_label_fields_format(tiny_run):
    t = extract(tiny_run, SENTS[:1], words="eat", epochs=[4], sites="encoder.self", kinds="q",
                label="{word}-{position:02d}-{epoch:03d}")
    assert list(t.meta["label"]) == ["eat-04-004"]


def test_projector_needs_one_width_and_is_checked_before_writing(tmp_path, tiny_run):
    with pytest.raises(QkvtraceError, match="format projector: .* widths 8, 16") as e:
        extract(tiny_run, SENTS, epochs=[4], heads="all", out=tmp_path / "p", format="projector")
    assert "\n" not in str(e.value) and not (tmp_path / "p").exists()
    t = extract(tiny_run, ["we eat\napple", SENTS[0]], epochs=[4], heads="all", kinds="q,k,x1",
                out=tmp_path / "p", format="projector")
    meta = (tmp_path / "p" / "metadata.tsv").read_text().splitlines()
    vecs = (tmp_path / "p" / "vectors.tsv").read_text().splitlines()
    assert len(meta) == len(vecs) + 1 == len(t) + 1
    assert all(len(line.split("\t")) == 8 for line in vecs)
    assert {len(line.split("\t")) for line in meta} == {len(meta[0].split("\t"))}


def test_unknown_words_in_sentences_are_noted(caplog, tiny_run):
    with caplog.at_level("WARNING", logger="qkvtrace"):
        t = extract(tiny_run, [("we eat zebra", "wir essen flarp")], epochs=[4], sites="encoder.self", kinds="q")
    assert "source vocabulary, read as <unk>: zebra" in caplog.text
    assert "target vocabulary, read as <unk>: flarp" in caplog.text
    assert "<unk>" in set(t.meta["token"])


def test_public_api_names_stay_functions_after_their_modules_are_imported(tmp_path, tiny_run):
    import qkvtrace
    import qkvtrace.extract  # noqa: F401  (binds the submodule as a package attribute; the API must win)
    import qkvtrace.project  # noqa: F401
    import qkvtrace.train  # noqa: F401

    assert qkvtrace.extract is extract and callable(qkvtrace.train) and callable(qkvtrace.project)
    first = qkvtrace.extract(tiny_run, SENTS[:1], words="eat", epochs=[4], out=tmp_path / "v")
    again = qkvtrace.load_vectors(tmp_path / "v")
    assert len(first) == len(again) and len(repr(again)) < 400


def test_aliases_label_rows_and_greedy_transitions_follow_the_translation(tiny_run):
    t = extract(tiny_run, SENTS[:1], words="eat", epochs=[4], sites="encoder.self", kinds="x1,x4")
    assert set(t.meta["label"]) == {"eat@x1@4", "eat@x4@4"}
    greedy = extract(tiny_run, SENTS[:1], epochs=[4], sites="decoder.self", kinds="q", layers="0")
    order = np.argsort(greedy.meta["position"])
    tokens = [tok.strip("<>") for tok in tiny_run.translate(SENTS[:1], 4)[0].tokens]
    steps = ["sos"] + tokens
    assert list(greedy.meta["transition"][order]) == [f"{a}->{b}" for a, b in zip(steps, steps[1:])][: len(order)]


@pytest.mark.parametrize("args, needle", [
    (["--epochs", ""], "--epochs ''"),
    (["--format", "projector", "--heads", "all"], "--format projector:"),
    (["--words", "eat", "--sites", "decoder.self"], "--words eat: occurs only on the source side"),
    (["--label", "{word:d}"], "--label '{word:d}'"),
    (["--layers", "3"], "--layers '3': unknown; valid: all, 0"),
    (["--max-memory", "-1"], "--max-memory -1"),
    (["--epochs", "3"], "--epochs 3: "),
])
def test_cli_extract_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_run, args, needle):
    from qkvtrace.cli import main

    out = tmp_path / "v"
    with pytest.raises(SystemExit) as e:
        main(["extract", str(tiny_run.path), "-s", SENTS[0], "--out", str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not out.exists()


def test_sentence_file_with_bom_crlf_and_extra_columns(tmp_path):
    f = tmp_path / "s.txt"
    f.write_bytes("\ufeffwe eat apple\twir essen apfel\r\ni read book\r\n".encode("utf-8"))
    s = read_sentences(f)
    assert [(x.src, x.tgt) for x in s] == [("we eat apple", "wir essen apfel"), ("i read book", None)]
    f.write_text("we eat apple\twir essen apfel\tfood\n")
    with pytest.raises(QkvtraceError, match=r"s.txt:1: 3 tab-separated columns"):
        read_sentences(f)


def test_closest_words_are_named_once_even_when_in_both_vocabularies():
    from types import SimpleNamespace

    from qkvtrace.sources import RunSource
    from qkvtrace.vocab import SPECIALS, Vocab

    source = object.__new__(RunSource)
    source.run = SimpleNamespace(src_vocab=Vocab([*SPECIALS, "pizza", "pasta", "eat"]),
                                 tgt_vocab=Vocab([*SPECIALS, "pizza", "nudeln", "essen"]), subword=False)
    with pytest.raises(QkvtraceError, match="closest: pizza, pasta") as e:
        source.check_word("pizzza")
    near = str(e.value).split("closest: ")[1].split(", ")
    assert len(near) == len(set(near)) == 5


def test_single_numbers_select_like_lists(tiny_run):
    one = extract(tiny_run, SENTS[:1], epochs=4, sites="encoder.self", kinds="q", layers=0, heads=1)
    listed = extract(tiny_run, SENTS[:1], epochs=[4], sites="encoder.self", kinds="q", layers=[0], heads=[1])
    assert len(one) == len(listed) > 0 and set(one.meta["head"]) == {"1"}
    np.testing.assert_array_equal(one.X, listed.X)
    alone = extract(tiny_run, SENTS[0], epochs=4, sites="encoder.self", kinds="q", layers=0, heads=1)
    np.testing.assert_array_equal(alone.X, one.X)


@pytest.mark.parametrize("label", ["{word}@{kind}@{epoch}", "{token}/{transition}/{position}/{sentence_id}",
                                   "{word!r}:{epoch:03d}:{kind:>4}", "{{lit}}-{word}-{layer}{head}",
                                   "x{word}{word}", "{site}"])
def test_labels_equal_the_template_formatted_row_by_row(label, tiny_run):
    """Labels are joined block-wise where they can be; every one must equal label.format(**row)."""
    t = extract(tiny_run, [SENTS[0], (SENTS[1], "wir wollen brot essen")], epochs=[2, 4], kinds="q,x1,layer_out",
                heads="concat,1", label=label)
    m = t.meta
    words = np.where(m["transition"] != "", m["transition"], m["token"])
    want = [label.format(word=w, token=m["token"][i], kind=m["kind"][i], epoch=m["epoch"][i], site=m["site"][i],
                         layer=m["layer"][i], head=m["head"][i], position=m["position"][i],
                         sentence_id=m["sentence_id"][i], transition=m["transition"][i])
            for i, w in enumerate(words)]
    assert len(want) > 50 and list(m["label"]) == want


def test_extract_and_its_manifest_do_not_load_sklearn(tmp_path, tiny_run):
    """Extraction never needs scikit-learn (1 s+ to import); the manifest reads its version from package metadata."""
    import subprocess
    import sys

    code = (f"import sys, json; from qkvtrace.extract import extract; "
            f"extract({str(tiny_run.path)!r}, ['we eat'], epochs=[4], out={str(tmp_path / 'v')!r}); "
            f"m = json.load(open({str(tmp_path / 'v' / 'manifest.json')!r})); "
            f"print('sklearn' in sys.modules, m['versions']['sklearn'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    import sklearn

    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", sklearn.__version__]
