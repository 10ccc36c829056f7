"""Hugging Face sources: exactness against the library's own outputs per family, pieces and pooling, references,
translation, checkpoint axes and one-line errors. Models are tiny, random and built in conftest (no network)."""

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HF_FAMILIES, tiny_hf_model

pytest.importorskip("transformers")

SENTS = [("we want to eat apple", "wir wollen apfel essen"), ("i can eat bread", "ich kann brot essen")]


def _batch(source):
    from qkvtrace.hf import pad_batch

    pad = source.config.pad_token_id
    src = [source.encode_source(s) for s, _ in SENTS]
    tgt = [source.encode_target(t)[:-1] for _, t in SENTS]
    return pad_batch(src, pad) + pad_batch(tgt, pad)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_capture_equals_the_library_outputs(hf_models, family):
    """pattern == output_attentions, layer_out == hidden_states, z·Wo + b == the attention module's output and
    q, k, v == the projections of the attention module's input, at every site and layer."""
    import torch
    import torch.nn.functional as F

    from qkvtrace.extract import SITES
    from qkvtrace.hf import capture, forward, hook_name, module_of
    from qkvtrace.sources import open_source

    source = open_source(str(hf_models[family]))
    model, layout, cfg = source.model(0), source.layout, source.model_cfg
    src, src_mask, tgt, tgt_mask = _batch(source)
    kinds = ("q", "k", "v", "z", "attn_out", "layer_out", "pattern")
    wanted = [(site, layer, kind) for site in SITES for layer in range(2) for kind in kinds]
    inputs = {}  # attention module path -> (x, source of k and v), as the library called it
    modules = dict(model.named_modules())
    handles = []
    for site in SITES:
        for layer in range(2):
            path, _ = module_of(layout, 2, site, layer, "attn_out")

            def keep(m, args, kwargs, path=path):
                x = args[0] if args else kwargs["hidden_states"]
                inputs[path] = (x, kwargs.get("key_value_states") if kwargs.get("key_value_states") is not None else x)
            handles.append(modules[path].register_forward_pre_hook(keep, with_kwargs=True))
    def hooks():
        return [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]

    before = hooks()
    with torch.no_grad():
        with capture(model, layout, cfg, wanted) as cache:
            forward(model, src, src_mask, tgt, tgt_mask)
        for h in handles:
            h.remove()
        assert hooks() == [(n, f, p - (n in inputs)) for n, f, p in before]  # capture's hooks are gone
        ref = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask,
                     output_attentions=True, output_hidden_states=True, use_cache=False)
    library = {"encoder.self": (ref.encoder_attentions, ref.encoder_hidden_states),
               "decoder.self": (ref.decoder_attentions, ref.decoder_hidden_states),
               "decoder.cross": (ref.cross_attentions, ref.decoder_hidden_states)}
    for site in SITES:
        attentions, hidden = library[site]
        for layer in range(2):
            c = {k: cache[hook_name(site, layer, k)] for k in kinds}
            torch.testing.assert_close(c["pattern"], attentions[layer], rtol=0, atol=0)
            torch.testing.assert_close(c["layer_out"], hidden[layer + 1], rtol=0, atol=0)
            path, _ = module_of(layout, 2, site, layer, "attn_out")
            attn = modules[path]
            o = getattr(attn, layout.o)
            B, T = c["z"].shape[:2]
            torch.testing.assert_close(F.linear(c["z"].reshape(B, T, -1), o.weight, o.bias), c["attn_out"],
                                       rtol=0, atol=1e-6)
            x, kv = inputs[path]
            for kind, inp in (("q", x), ("k", kv), ("v", kv)):
                proj = getattr(attn, getattr(layout, kind))
                expected = F.linear(inp, proj.weight, proj.bias)
                assert c[kind].shape == (*expected.shape[:2], cfg.n_heads, cfg.d_head)
                torch.testing.assert_close(c[kind].reshape(expected.shape), expected, rtol=0, atol=1e-6)


def test_group_words_and_pool():
    from qkvtrace.pieces import group_words, pool

    pieces = ["▁i", "▁", "e", "at", "▁ap", "ple", ".", "</s>"]
    words = group_words(pieces, [False] * 7 + [True])
    assert [(w.text, w.start, w.end) for w in words] == [("i", 0, 1), ("eat", 1, 4), ("apple", 4, 6), (".", 6, 7),
                                                        ("</s>", 7, 8)]
    assert [w.text for w in group_words(["play", "##ing", "now"])] == ["playing", "now"]  # WordPiece continues with ##
    t = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)  # (batch, pos, d)
    b, s, e = np.array([0, 0, 1]), np.array([1, 4, 0]), np.array([4, 6, 1])
    np.testing.assert_allclose(pool(t, b, s, e, "mean"), [t[0, 1:4].mean(0), t[0, 4:6].mean(0), t[1, 0]])
    np.testing.assert_array_equal(pool(t, b, s, e, "first"), t[[0, 0, 1], [1, 4, 0]])
    np.testing.assert_array_equal(pool(t, b, s, e, "last"), t[[0, 0, 1], [3, 5, 0]])


@pytest.fixture(scope="module")
def marian(hf_models):
    from qkvtrace.sources import open_source

    return open_source(str(hf_models["marian"]))


def test_rows_record_words_pieces_and_pool(marian):
    from qkvtrace.extract import extract

    pieces = extract(marian, SENTS, kinds="k,layer_out", sites="encoder.self,decoder.self", layers=0, pool="none",
                     patterns=False)
    words = extract(marian, SENTS, kinds="k,layer_out", sites="encoder.self,decoder.self", layers=0, pool="mean",
                    patterns=False)
    eat = pieces.where(kind="k", site="encoder.self", word="eat", sentence_id=0)
    assert len(eat) > 1 and list(eat.meta["piece_index"]) == list(range(len(eat)))  # "eat" is several pieces
    assert "".join(eat.meta["piece"]).replace("▁", "") == "eat"
    pooled = words.where(kind="k", site="encoder.self", word="eat", sentence_id=0)
    assert list(pooled.meta["label"]) == ["eat@k@0"] and pooled.meta["piece_index"][0] == -1
    np.testing.assert_allclose(pooled.vectors()[0], eat.vectors().mean(0), rtol=1e-6)
    tgt = words.where(kind="layer_out", site="decoder.self", sentence_id=0)
    assert list(tgt.meta["label"]) == ["sos->wir@layer_out@0", "wir->wollen@layer_out@0",
                                       "wollen->apfel@layer_out@0", "apfel->essen@layer_out@0",
                                       "essen->eos@layer_out@0"]
    # One row per word on the source side, specials left out: we want to eat apple / i can eat bread.
    assert len(words.where(kind="k", site="encoder.self")) == 9


def test_words_filter_and_unknown_word(marian):
    from qkvtrace.errors import QkvtraceError
    from qkvtrace.extract import extract

    t = extract(marian, SENTS, words="eat,sos->wir", kinds="q", patterns=False)
    assert set(t.meta["word"]) == {"eat", "sos"} and set(t.where(side="tgt").meta["transition"]) == {"sos->wir"}
    with pytest.raises(QkvtraceError, match=r"words bred: occurs in none of the given sentences; closest words "
                                            r"of the model's vocabulary: .*"):
        extract(marian, SENTS, words="bred", kinds="q")


def test_t5_layer0_qkv_do_not_depend_on_position(hf_models):
    """T5 adds positions only as a bias on the scores: a token's layer-0 q, k and v are the same at any position."""
    from qkvtrace.extract import extract

    t = extract(str(hf_models["t5"]), ["eat apple", "i can eat apple"], words="eat", sites="encoder.self",
                kinds="q,k,v", layers=0, patterns=False)
    for kind in "qkv":
        rows = t.where(kind=kind).vectors()
        assert len(rows) == 2 and np.array_equal(rows[0], rows[1])


def test_checkpoint_axis_from_checkpoint_folders(tmp_path, hf_models):
    """A folder of checkpoint-N subfolders is one extraction's checkpoint axis, numbered N."""
    import shutil

    from qkvtrace.extract import extract

    for n in (500, 1000):
        shutil.copytree(hf_models["bart"], tmp_path / f"checkpoint-{n}")
    t = extract(str(tmp_path), ["i can eat bread"], words="eat", kinds="q", sites="encoder.self", patterns=False)
    assert sorted(set(t.meta["epoch"])) == [500, 1000] and set(t.meta["label"]) == {"eat@q@500", "eat@q@1000"}
    assert t.manifest["checkpoints"] == {"500": str(tmp_path / "checkpoint-500"),
                                         "1000": str(tmp_path / "checkpoint-1000")}


def test_unsupported_and_offline_references(tmp_path, monkeypatch):
    import transformers as tf

    from qkvtrace.errors import QkvtraceError
    from qkvtrace.sources import open_source

    cfg = tf.PegasusConfig(vocab_size=20, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=8)
    cfg.save_pretrained(tmp_path / "pegasus")
    with pytest.raises(QkvtraceError, match=r"PegasusForConditionalGeneration \(model_type 'pegasus'\) is not "
                                            r"supported: .*none are mapped for 'pegasus'; supported: Marian"):
        open_source(str(tmp_path / "pegasus"))
    tf.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(QkvtraceError, match=r"BertConfig \(model_type 'bert'\) is not an encoder-decoder"):
        open_source(str(tmp_path / "bert"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    with pytest.raises(QkvtraceError, match=r"hf:nobody/nothing: not in the local Hugging Face cache and "
                                            r"HF_HUB_OFFLINE is set; .*pass a local folder"):
        open_source("hf:nobody/nothing")


def test_cli_translate_and_extract(tmp_path, hf_models):
    import json

    from click.testing import CliRunner

    from qkvtrace.cli import cli

    ref = str(hf_models["marian"])
    runner = CliRunner()
    r = runner.invoke(cli, ["translate", ref, "i can eat bread", "--json", "--beams", "2"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output.splitlines()[0])
    assert row["source"] == "i can eat bread" and row["epoch"] == 0 and isinstance(row["text"], str)
    out = tmp_path / "vec"
    r = runner.invoke(cli, ["extract", ref, "-s", "we want to eat apple", "--words", "eat,apple", "--pool", "first",
                            "--kinds", "q,x1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pool"] == "first" and manifest["model"]["family"] == "marian"
    # The explorer page reads a Hugging Face table (extra columns word, piece, piece_index) as any other.
    r = runner.invoke(cli, ["view", str(out), "--methods", "pca", "--neighbours", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "explorer.html").stat().st_size > 10_000 and "apple" in (out / "explorer.html").read_text()


def test_cli_similarity_and_attention(tmp_path, hf_models, qkvtrace_cli):
    """similarity and attention take a Hugging Face model as they take a run: rows are words, pieces pooled."""
    from click.testing import CliRunner

    from qkvtrace.cli import cli

    ref = str(hf_models["bart"])
    runner = CliRunner()
    r = runner.invoke(cli, ["similarity", ref, "we can eat apple", "apple eat can we", "--kind", "k",
                            "--out", str(tmp_path / "tables")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "cosine k · encoder.self layer 0 · epoch 0"
    assert lines[1].split() == ["apple", "eat", "can", "we"] and [x.split()[0] for x in lines[2:6]] == \
        ["we", "can", "eat", "apple"]
    # The same word's layer-0 key at another position: BART's learned positions make it differ, a little.
    assert 0.0 < float(lines[4].split()[2]) < 1.0
    assert (tmp_path / "tables" / "similarity-k-encoder.self-L0-e0.png").is_file()
    r = runner.invoke(cli, ["similarity", ref, "we can eat apple", "apple eat can we", "--kind", "pattern",
                            "--site", "decoder.cross", "--layer", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["attention", ref, "i can eat bread", "--site", "encoder.self", "--layer", "1",
                            "--out", str(tmp_path / "attn.png")])
    assert r.exit_code == 0 and (tmp_path / "attn.png").stat().st_size > 1000, r.output
    r = qkvtrace_cli("similarity", ref, "a", "b", "--layer", "2")
    assert r.returncode == 2 and r.stderr == "error: --layer 2: the model has layers 0..1\n"


def test_finetune_checkpoints_resume_bitwise_and_extract(tmp_path, hf_models, tiny_tsv):
    """train --init keeps safetensors checkpoints and metrics; an interrupted run resumed gives the same weights bit
    for bit; the run is a source whose checkpoints form the epoch axis of an extraction."""
    from qkvtrace.extract import extract
    from qkvtrace.finetune import finetune
    from qkvtrace.train import read_metrics, read_safetensors

    opts = dict(corpus=str(tiny_tsv), epochs=2, checkpoints=[1, 2], lr=1e-3, batch_size=8, seed=3)
    run = finetune(str(hf_models["marian"]), tmp_path / "whole", **opts)
    assert run.checkpoint_epochs() == [1, 2]
    rows = read_metrics(tmp_path / "whole")
    assert [r["epoch"] for r in rows] == [1, 2] and {"val_bleu", "val_exact_match", "train_loss"} <= set(rows[0])

    def stop_after_first(e):
        if e["event"] == "epoch" and e["epoch"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        finetune(str(hf_models["marian"]), tmp_path / "cut", progress=stop_after_first, **opts)
    finetune(str(hf_models["marian"]), tmp_path / "cut", resume=True, **opts)
    a, _ = read_safetensors(tmp_path / "whole" / "checkpoints" / "epoch-002.safetensors")
    b, _ = read_safetensors(tmp_path / "cut" / "checkpoints" / "epoch-002.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    t = extract(str(tmp_path / "whole"), ["i can eat bread"], words="eat", kinds="k", sites="encoder.self", layers=0,
                patterns=False)
    assert list(t.meta["label"]) == ["eat@k@1", "eat@k@2"]
    assert not np.array_equal(t.X[0], t.X[1])  # fine-tuning moved k
    # run.json lists every checkpoint and base file with its sha256, as for runs of our own; a damaged file is
    # refused when it is loaded.
    import json

    from qkvtrace.errors import QkvtraceError
    from qkvtrace.files import sha256_file
    from qkvtrace.sources import open_source

    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert [c["epoch"] for c in info["checkpoints"]] == [1, 2] and info["resume"]["epoch"] == 2
    assert all(c["sha256"] == sha256_file(tmp_path / "cut" / c["file"]) for c in info["checkpoints"])
    assert "base/config.json" in info["files"]
    assert not (tmp_path / "cut" / "checkpoints" / "resume-001.safetensors").exists()  # the older state is gone
    ckpt = tmp_path / "cut" / "checkpoints" / "epoch-001.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 1
    ckpt.write_bytes(bytes(data))
    with pytest.raises(QkvtraceError, match=r"epoch-001.safetensors: damaged or replaced: sha256 .*run.json recorded"):
        open_source(str(tmp_path / "cut")).model(1)


def test_study_model_t5_reports_the_relative_position_finding(tmp_path, hf_models, monkeypatch):
    """study --model runs the study's experiment file on the model: every claim that applies decided (decoder
    scatter and five sentences included), figures and report as for a run of our own, movement left out with its
    reason, and T5's relative-position finding."""
    import json

    from click.testing import CliRunner

    from qkvtrace.cli import cli

    monkeypatch.setenv("QKVTRACE_WORKERS", "2")  # the figures drawn in forked workers, as on a 2-core machine
    r = CliRunner().invoke(cli, ["study", "--model", str(hf_models["t5"]), "--out", str(tmp_path / "s"), "--set",
                                 'sentences.buy.sample={verb="buy", per_category=3, seed=0}'])
    assert r.exit_code == 0, r.output
    assert "[does not apply] Movement during training" in r.output
    v = json.loads((tmp_path / "s" / "verdicts.json").read_text())
    decided = {x["key"]: x["verdict"] for x in v["by_seed"]["0"]}
    assert set(decided) == {"a", "b", "c1", "c2", "c3", "c4", "d", "e", "r"} and decided["r"] == "holds"
    # The tiny T5's q/k/v/z are 2 heads x 4 = 8 wide, attn_out 16: one figure cannot project both.
    assert [x["claim"] for x in v["not_applicable"]] == ["Movement during training", "Figure five-sentences"]
    out = tmp_path / "s"
    assert {"encoder-eat-2d.png", "decoder-cross.png"} <= {p.name for p in (out / "figures").iterdir()}
    assert (out / "index.html").is_file() and "Claims that do not apply" in (out / "report.md").read_text()


def test_bench_extract_hf_row(tmp_path, hf_models):
    from qkvtrace.bench import bench_extract_hf
    from tests.conftest import PAIRS

    (tmp_path / "train.en").write_text("".join(s + "\n" for s, _ in PAIRS))
    (tmp_path / "train.de").write_text("".join(t + "\n" for _, t in PAIRS))
    r = bench_extract_hf(str(hf_models["marian"]), n_sentences=6, batch_size=4, rounds=1, corpus_dir=tmp_path,
                         memory=False)
    assert r["n_sentences"] == 6 and r["family"] == "marian" and r["params"] > 0
    assert r["capture_vs_plain"] == r["capture_s"] / r["plain_s"] > 0


def test_experiment_file_with_a_model_source(tmp_path, hf_models, qkvtrace_cli, monkeypatch):
    """[model] source = a Hugging Face folder: nothing is trained, figures and report come from that model; a
    source with shape keys, or a missing folder, is one line naming the file, line and key."""
    import shutil

    monkeypatch.setenv("QKVTRACE_WORKERS", "2")
    shutil.copytree(hf_models["t5"], tmp_path / "t5")
    exp = tmp_path / "exp.toml"
    body = '''name = "t5-source"
[model]
source = "t5"
[[sentences]]
name = "pair"
items = ["we can eat apple", "apple eat can we"]
[[figures]]
type = "scatter"
name = "keys"
sentences = "pair"
kinds = ["k"]
layer = 1
[[figures]]
type = "similarity"
name = "sim"
sentences = "pair"
kind = "k"
[[figures]]
type = "attention"
name = "attn"
sentence = "we can eat apple"
site = "encoder.self"
'''
    exp.write_text(body)
    r = qkvtrace_cli("run", exp, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert {"keys.png", "attn.png"} <= {p.name for p in (out / "figures").iterdir()}
    assert (out / "figures" / "sim" / "similarity-k-encoder.self-L0-e0.csv").is_file() and not (out / "run").exists()
    report = (out / "report.md").read_text()
    assert "nothing trained" in report and "T5ForConditionalGeneration" in report
    from qkvtrace.table import VectorTable

    table = VectorTable.load(out / "vectors" / "pair")
    assert set(table.meta["word"]) == {"we", "can", "eat", "apple"} and set(table.meta["epoch"]) == {0}
    from qkvtrace.experiment import load_experiment

    again = load_experiment(out / "config.resolved.toml")  # the resolved file reads back to the same experiment
    assert again.source == str(tmp_path / "t5") and again.figures == load_experiment(exp).figures

    exp.write_text(body.replace('source = "t5"', 'source = "t5"\nd_model = 32'))
    r = qkvtrace_cli("run", exp, "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {exp}:4: [model] d_model with source:")
    exp.write_text(body.replace('source = "t5"', 'source = "nowhere"'))
    r = qkvtrace_cli("run", exp, "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr == (f"error: {exp}:3: source = 'nowhere': no such folder; write a run "
                                             "directory, hf:NAME[@REVISION] or a folder written by save_pretrained\n")
    exp.write_text(body.replace("layer = 1", "layer = 2"))
    r = qkvtrace_cli("run", exp, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "layer 2: the model has layers 0..1" in r.stderr and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    """Tiny random NLLB (M2M100 architecture, NllbTokenizer), mBART-50 and mBART (cc25: the language code ends a
    sentence) models whose tokenizers carry their real language codes."""
    import json

    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.conftest import PAIRS

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([s for p in PAIRS for s in p], trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    nllb = tf.NllbTokenizer(vocab={p: i for i, (p, _) in enumerate(vocab)}, merges=[])  # BPE without merges
    tokenizers = {"nllb": (nllb, tf.M2M100Config),
                  "mbart50": (tf.MBart50Tokenizer(vocab=vocab), tf.MBartConfig),
                  "mbart": (tf.MBartTokenizer(vocab=vocab), tf.MBartConfig)}
    out = {}
    for name, (tokenizer, Config) in tokenizers.items():
        config = Config(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = tf.AutoModelForSeq2SeqLM.from_config(config)
        folder = tmp_path_factory.mktemp(name)
        model.generation_config.max_length = 8
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[name] = str(folder)
    return out


def test_language_codes_of_multilingual_models(multilingual, hf_models, qkvtrace_cli):
    """NLLB, mBART-50 and mBART read English and write German by default; --src-lang/--tgt-lang choose others; the
    target's code is where the model expects it (generate forced to begin with it, or mBART's decoder start)."""
    import json

    from qkvtrace.extract import extract
    from qkvtrace.sources import open_source

    nllb = open_source(multilingual["nllb"])
    assert (nllb.src_lang, nllb.tgt_lang) == ("eng_Latn", "deu_Latn")
    t = extract(nllb, [("we can eat", "wir essen")], sites="encoder.self,decoder.self", kinds="q", specials=True,
                patterns=False)
    assert t.where(side="src").meta["token"][0] == "eng_Latn"
    assert list(t.where(side="tgt").meta["transition"][:2]) == ["sos->deu_Latn", "deu_Latn->wir"]
    made = nllb.generate([nllb.encode_source("we can eat")], 0)[0]
    assert made[1] == nllb.tokenizer.convert_tokens_to_ids("deu_Latn")  # forced_bos_token_id
    r = qkvtrace_cli("translate", multilingual["nllb"], "we can eat", "--src-lang", "fra_Latn", "--tgt-lang",
                     "spa_Latn", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"][0] == "spa_Latn", r.stderr
    r = qkvtrace_cli("extract", multilingual["mbart50"], "-s", "we can eat", "--tgt-lang", "fr_XX", "--sites",
                     "decoder.self", "--kinds", "q", "--out", str(Path(multilingual["mbart50"]) / "v"))
    assert r.returncode == 0, r.stderr
    from qkvtrace.table import VectorTable

    v = VectorTable.load(Path(multilingual["mbart50"]) / "v")
    assert v.meta["transition"][0] == "sos->fr_XX" and v.manifest["languages"] == {"src": "en_XX", "tgt": "fr_XX"}
    mbart = open_source(multilingual["mbart"])
    de = mbart.tokenizer.convert_tokens_to_ids("de_DE")
    assert mbart.encode_target("wir essen")[0] == de and mbart.generate([mbart.encode_source("we")], 0)[0][0] == de
    r = qkvtrace_cli("translate", multilingual["nllb"], "we can eat", "--tgt-lang", "deu")
    assert r.returncode == 2 and r.stderr.startswith("error: --tgt-lang 'deu': not a language code of this model; "
                                                     "e.g. ") and "deu_Latn" in r.stderr
    r = qkvtrace_cli("extract", multilingual["mbart"], "-s", "we", "--src-lang", "xx")
    assert r.returncode == 2 and r.stderr.startswith("error: --src-lang 'xx': not a language code")
    r = qkvtrace_cli("translate", hf_models["marian"], "we", "--src-lang", "en")
    assert r.returncode == 2 and r.stderr.endswith("has no language codes; it translates the one language pair it "
                                                   "was trained on\n") and r.stderr.startswith("error: --src-lang en:")


def test_streaming_memory_does_not_grow_with_the_sentences(tmp_path, marian):
    """What streaming holds at its peak is the same for 4x the sentences: rows and patterns are written at
    max_memory_mb, and nothing is kept per sentence beyond its ids. Numpy arrays and Python objects are traced
    (tracemalloc) up to the last batch; the fixed 16 MB chunks of the final X.npy copy are left out."""
    import tracemalloc

    from qkvtrace.extract import extract
    from tests.conftest import PAIRS

    def stream(n: int, out: Path) -> tuple[int, int]:
        """(traced peak bytes up to the last batch, bytes written) of streaming n sentences, every kind and
        pattern, single heads as well (rows narrower than the widest are padded as they are written)."""
        peak = []
        tracemalloc.start()
        try:
            extract(marian, (PAIRS * n)[:n], out=out, max_memory_mb=0.02, batch_size=4, load=False,
                    heads="concat,0", progress=lambda e: peak.append(tracemalloc.get_traced_memory()[1]))
        finally:
            tracemalloc.stop()
        return peak[-1], sum(f.stat().st_size for f in out.iterdir())

    stream(4, tmp_path / "warm")  # the model loads and the libraries warm up outside the measurement
    (small, _), (large, written) = stream(24, tmp_path / "s"), stream(96, tmp_path / "l")
    assert written > 2_000_000  # 96 sentences write MBs: holding even a tenth of them would show below
    assert large - small < 200_000, (small, large, written)


@pytest.mark.parametrize("name", ["nllb", "mbart"])
def test_finetune_encodes_targets_with_the_language_code_where_the_model_expects_it(name, multilingual, tiny_tsv,
                                                                                    tmp_path, monkeypatch):
    """Fine-tuning feeds the decoder what translation and extraction feed it: NLLB's target code after the start
    token, mBART's target code as the decoder's start (its labels end with it), not the start token before it."""
    import importlib

    from qkvtrace.finetune import finetune
    from qkvtrace.sources import open_source

    train_module = importlib.import_module("qkvtrace.train")  # the package's `train` attribute is the function
    seen = []
    real = train_module.encode_pairs

    def spy(pairs, src_vocab, tgt_vocab, max_len):
        out = real(pairs, src_vocab, tgt_vocab, max_len)
        seen.append(out[1])
        return out

    monkeypatch.setattr(train_module, "encode_pairs", spy)
    finetune(multilingual[name], tmp_path / "ft", corpus=str(tiny_tsv), epochs=1, batch_size=8, seed=0)
    source = open_source(multilingual[name])
    de = source.tokenizer.convert_tokens_to_ids("deu_Latn" if name == "nllb" else "de_DE")
    first = list(seen[0][0])
    assert first[:2] == ([source.start_id, de] if name == "nllb" else [de, first[1]]) and de not in first[2:]


def test_finetune_reads_and_writes_the_corpus_languages_with_the_models_codes(multilingual, tmp_path, qkvtrace_cli,
                                                                             monkeypatch):
    """A French-German corpus fine-tunes NLLB as fra_Latn -> deu_Latn and mBART as fr_XX -> de_DE, not the
    tokenizer's English default; the run keeps them as its direction; a language the model lacks is one line."""
    import importlib
    import json

    from qkvtrace.finetune import finetune
    from qkvtrace.sources import open_source
    from tests.conftest import PAIRS

    corpus = tmp_path / "fr-de"
    corpus.mkdir()
    (corpus / "train.fr").write_text("".join(f"{s}\n" for s, _ in PAIRS))
    (corpus / "train.de").write_text("".join(f"{t}\n" for _, t in PAIRS))
    train_module = importlib.import_module("qkvtrace.train")  # the package's `train` attribute is the function
    seen, real = [], train_module.encode_pairs
    monkeypatch.setattr(train_module, "encode_pairs", lambda *a: seen.append(real(*a)) or seen[-1])
    for name, expect in (("nllb", ("fra_Latn", "deu_Latn")), ("mbart", ("fr_XX", "de_DE"))):
        run = tmp_path / f"ft-{name}"
        finetune(multilingual[name], run, corpus=str(corpus), src_lang="fr", tgt_lang="de", epochs=1, batch_size=8)
        codes = open_source(multilingual[name]).tokenizer.convert_tokens_to_ids(list(expect))
        src_ids, tgt_ids = seen[-2][0][0], seen[-2][1][0]  # the training pairs' first: the source and target codes
        assert codes[0] in src_ids and codes[1] in tgt_ids, (name, src_ids, tgt_ids)
        assert json.loads((run / "run.json").read_text())["hf"]["languages"] == dict(zip(("src", "tgt"), expect))
        tuned = open_source(run)
        assert (tuned.src_lang, tuned.tgt_lang) == expect
        assert tuned.tokenizer.convert_tokens_to_ids(expect[0]) in tuned.encode_source("nous mangeons")
    (corpus / "train.xx").write_text((corpus / "train.fr").read_text())
    r = qkvtrace_cli("train", "--init", multilingual["nllb"], "--corpus", str(corpus), "--src-lang", "xx",
                     "--tgt-lang", "de", "--run-dir", str(tmp_path / "never"), "--epochs", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --src-lang xx: no language code of this model matches it (e.g. ")
    assert not (tmp_path / "never").exists()


def test_encoder_and_decoder_of_different_depth(hf_models, tmp_path, qkvtrace_cli):
    """A distilled model with 2 encoder layers and 1 decoder layer: every layer of each stack is extracted (the
    encoder's last layer_out equals the library's encoder output), a layer only the encoder has is refused for the
    decoder's sites alone, in one line."""
    import shutil

    import torch
    import transformers as tf

    from qkvtrace.extract import extract
    from qkvtrace.sources import open_source

    folder = tmp_path / "bart-2-1"
    shutil.copytree(hf_models["bart"], folder)
    config = tf.AutoConfig.from_pretrained(folder)
    config.decoder_layers = 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tf.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    source = open_source(str(folder))
    assert (source.n_layers, source.site_layers("encoder.self"), source.site_layers("decoder.cross")) == (2, 2, 1)
    t = extract(source, [("we can eat", "wir essen")], kinds="q,layer_out", pool="none", specials=True)
    layers = {site: sorted(set(t.where(site=site).meta["layer"].tolist())) for site in
              ("encoder.self", "decoder.self", "decoder.cross")}
    assert layers == {"encoder.self": [0, 1], "decoder.self": [0], "decoder.cross": [0]}
    with torch.no_grad():
        ids = torch.tensor([source.encode_source("we can eat")])
        expect = source.model(0).get_encoder()(input_ids=ids).last_hidden_state[0].numpy()
    got = t.where(site="encoder.self", layer=1, kind="layer_out")
    np.testing.assert_allclose(got.vectors()[np.argsort(got.meta["position"])], expect, atol=1e-6)
    assert len(extract(source, ["we can eat"], layers="1", kinds="q")) > 0  # the encoder's layer 1 alone
    r = qkvtrace_cli("extract", str(folder), "-s", "we can eat", "--sites", "decoder.self,decoder.cross",
                     "--layers", "1", "--out", str(tmp_path / "v"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "v").exists()
    assert r.stderr.startswith("error: --layers 1: none of the selected sites has it (decoder.self 0..0, "
                               "decoder.cross 0..0)")
