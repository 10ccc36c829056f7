"""Shared fixtures: a dozen hand-written pairs, a tiny model config, and one tiny run trained once per session."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import subprocess
import sys

import pytest

# UMAP's numba code is compiled once per installation into qkvtrace's numba cache (about 20 s on 2 cores; the
# cache is keyed by the source files' paths, so a new virtual environment compiles again). A background process
# loads or compiles it on the other core while the first test files run (2 s when the cache is warm); tests that
# fit UMAP ask for the `umap_compiled` fixture, which waits for it, instead of compiling it themselves, serially.
WARM_UMAP = """
import numpy as np
from qkvtrace.project import project, project_epochs
X = np.random.default_rng(0).normal(size=(40, 12))
for dims in (2, 3):
    project(X, "umap", dims=dims)
epochs = np.repeat([1, 2], 20)
project_epochs(X, epochs, np.tile(np.arange(20), 2), "umap", dims=2, frame="aligned-umap")
"""
_warming: subprocess.Popen | None = None


def pytest_sessionstart(session):
    global _warming
    # At the lowest priority: it takes the core the tests leave idle, never one they want.
    _warming = subprocess.Popen([sys.executable, "-c", WARM_UMAP], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19))


@pytest.fixture
def umap_compiled():
    """UMAP's numba code is in the cache: waits for the background compile started with the session."""
    global _warming
    if _warming is not None:
        _warming.wait()
        _warming = None


def pytest_sessionfinish(session):
    if _warming is not None:
        _warming.kill()


PAIRS = [
    ("we want to eat apple", "wir wollen apfel essen"),
    ("we want to eat bread", "wir wollen brot essen"),
    ("we can eat apple", "wir können apfel essen"),
    ("i can eat apple", "ich kann apfel essen"),
    ("i can eat bread", "ich kann brot essen"),
    ("i can drink water", "ich kann wasser trinken"),
    ("we can drink beer", "wir können bier trinken"),
    ("i want to read book", "ich will buch lesen"),
    ("we want to read newspaper", "wir wollen zeitung lesen"),
    ("i eat bread", "ich esse brot"),
    ("we drink water", "wir trinken wasser"),
    ("i read book", "ich lese buch"),
]

TINY_MODEL = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "dropout": 0.0, "max_len": 16}


@pytest.fixture(scope="session")
def tiny_tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_configs(tiny_tsv):
    from qkvtrace.config import ModelConfig, TrainConfig

    model = ModelConfig(**TINY_MODEL)
    train = TrainConfig(corpus=str(tiny_tsv), epochs=4, checkpoints=(1, 2, 4), batch_size=4, lr=3e-3,
                        val_fraction=0.25, device="cpu")
    return model, train


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_configs):
    """A tiny run trained once (seconds) and shared by every test that only reads it."""
    from qkvtrace.train import train

    model, train_cfg = tiny_configs
    return train(model, train_cfg, tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def qkvtrace_cli(capsys, monkeypatch):
    """Run `qkvtrace ARGS...` in this process (as the console script does, through main()); returns an object with
    returncode, stdout and stderr like subprocess.run's. `cwd=` runs it in another directory."""
    from types import SimpleNamespace

    from qkvtrace.cli import main

    def run(*args, cwd=None):
        capsys.readouterr()  # drop anything printed before
        with monkeypatch.context() as m:
            if cwd is not None:
                m.chdir(cwd)
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run
# --- tiny Hugging Face models (no network): one per supported family, with a tokenizer trained here ---

HF_FAMILIES = ("marian", "bart", "mbart", "m2m_100", "t5")


def tiny_hf_model(folder, family: str):
    """Save a randomly initialised `family` model (d_model 16, 2 layers, 2 heads) and a unigram tokenizer trained
    on PAIRS into `folder`; a few KB, no download."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = [s for p in PAIRS for s in p] + ["apple. bread, book!", "the quick brown fox jumps over a lazy dog"]
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                           unk_token="<unk>")
    V = tok.get_vocab_size()
    common = dict(vocab_size=V, pad_token_id=0, eos_token_id=1, bos_token_id=1, forced_eos_token_id=None)
    bartish = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                   **common)
    config = {"marian": lambda: tf.MarianConfig(decoder_start_token_id=0, decoder_vocab_size=V, **bartish),
              "bart": lambda: tf.BartConfig(decoder_start_token_id=1, **bartish),
              "mbart": lambda: tf.MBartConfig(decoder_start_token_id=1, **bartish),
              "m2m_100": lambda: tf.M2M100Config(decoder_start_token_id=1, **bartish),
              "t5": lambda: tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                        relative_attention_num_buckets=8, decoder_start_token_id=0, **common)}[family]()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config.max_length = 12
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> folder of a tiny saved model of that family."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    return {f: tiny_hf_model(root / f, f) for f in HF_FAMILIES}
