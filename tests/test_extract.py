import math
import subprocess
import sys

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


def test_same_seed_same_vectors(tmp_path, tiny_configs, tiny_run):
    from qkvtrace.train import train

    model, cfg = tiny_configs
    again = train(model, cfg, tmp_path / "again")
    a = extract(tiny_run, SENTS, epochs=[2])
    b = extract(again, SENTS, epochs=[2])
    np.testing.assert_array_equal(a.X, b.X)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(words="zebra"), "not in the vocabulary; closest:"),
    (dict(words="beer"), "occurs in none of the given sentences"),
    (dict(epochs=[3]), "epochs with checkpoints: 1, 2, 4"),
    (dict(kinds="q,w"), "valid: q, k, v, z, attn_out, layer_out, x1, x4"),
    (dict(sites="encoder.cross"), "valid: encoder.self, decoder.self, decoder.cross"),
    (dict(layers="3"), "--layers '3'"),
    (dict(heads="5"), "--heads '5'"),
])
def test_bad_selection_is_one_clear_error(tiny_run, kwargs, needle):
    with pytest.raises(QkvtraceError, match=None) as e:
        extract(tiny_run, SENTS, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


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


def test_cli_extract_refuses_existing_out_and_keeps_it(tmp_path, tiny_run):
    out = tmp_path / "v"
    cmd = [sys.executable, "-m", "qkvtrace", "extract", str(tiny_run.path), "-s", SENTS[0], "--out", str(out),
           "--format", "projector"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    header = (out / "metadata.tsv").read_text().splitlines()[0].split("\t")
    assert header[:3] == ["epoch", "sentence_id", "sentence"]
    n_vec = len((out / "vectors.tsv").read_text().splitlines())
    assert n_vec == len(load_vectors(out))
    before = (out / "X.npy").read_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "X.npy").read_bytes() == before
