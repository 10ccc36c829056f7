"""Tests of qkvtrace.bench: the training benchmark against its two peers, and its CLI. No timing assertions: the
comparison's premises (same batches, same architecture, same loss) are what is tested."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from qkvtrace.bench import PeerTransformer, TutorialPeer, bench_train, n_params
from qkvtrace.cli import cli
from qkvtrace.config import ModelConfig
from qkvtrace.model import Transformer
from qkvtrace.train import pad


@pytest.fixture(scope="module")
def study_row():
    (row,) = bench_train("study", steps=2, warmup=1, rounds=2, seed=0)
    return row


def test_bench_train_times_the_same_batches_for_every_model(study_row):
    from qkvtrace.bench import _batches
    from qkvtrace.corpus import builtin_corpus

    r = study_row
    assert r["config"] == "study" and r["note"] is None
    assert (r["d_model"], r["n_layers"], r["n_heads"], r["d_ff"], r["batch_size"]) == (64, 2, 4, 128, 64)
    _, tgt_vocab, batches = _batches(builtin_corpus(0), ModelConfig(), 64, 2, 0)
    assert r["n_batches"] == 2 and r["tokens"] == sum(int((t[:, 1:] != 0).sum()) for _, t in batches)
    # The tutorial peer is our architecture parameter for parameter; nn.Transformer adds two final LayerNorms.
    assert r["n_params_tutorial"] == r["n_params_ours"] == r["n_params_peer"] - 4 * r["d_model"]
    # A few steps in, from the same kind of initialisation on the same batches, all three are still near ln(d_vocab).
    for side in ("ours", "peer", "tutorial"):
        assert abs(r[f"{side}_loss"] - math.log(len(tgt_vocab))) < 1.0, side
        assert r[f"{side}_ms_per_step"] > 0


def test_tutorial_peer_computes_our_loss_with_our_weights():
    """The tutorial peer is the same function written plainly: with our weights it gives our loss, so the timing
    compares implementations, not architectures."""
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, max_len=16)
    ours, peer = Transformer(cfg, 20, 30, seed=1).eval(), TutorialPeer(cfg, 20, 30).eval()
    renames = [("encoder.embed.tok", "src_tok"), ("encoder.embed.pos", "src_pos"), ("decoder.embed.tok", "tgt_tok"),
               ("decoder.embed.pos", "tgt_pos"), (".layers.", "."), ("q_proj", "fc_q"), ("k_proj", "fc_k"),
               ("v_proj", "fc_v"), ("out_proj", "fc_o"), ("ff.fc1", "ff.fc_1"), ("ff.fc2", "ff.fc_2"),
               ("lm_head", "fc_out")]
    state = {}
    for name, tensor in ours.state_dict().items():
        for a, b in renames:
            name = name.replace(a, b)
        state[name] = tensor
    peer.load_state_dict(state)  # strict: every tensor has its counterpart
    src = pad([[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 11, 12, 2]])
    tgt = pad([[1, 11, 12, 2], [1, 13, 14, 15, 16, 2], [1, 17, 2]])
    with torch.no_grad():
        (a, n_a, _), (b, n_b) = ours.loss(src, tgt), peer.loss(src, tgt)
    assert n_a == n_b == 10
    assert a.item() == pytest.approx(b.item(), abs=1e-5)


def test_peer_has_our_shape_and_loss_semantics():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
    ours, peer = Transformer(cfg, 20, 30), PeerTransformer(cfg, 20, 30)
    assert n_params(peer) - n_params(ours) == 2 * 2 * cfg.d_model  # two final LayerNorms (weight + bias)
    src = pad([[1, 5, 6, 2], [1, 7, 2]])
    tgt = pad([[1, 8, 9, 10, 2], [1, 11, 2]])
    loss, n = peer.eval().loss(src, tgt)
    assert n == ours.loss(src, tgt)[1] == 6 and torch.isfinite(loss)


def test_missing_multi30k_is_a_note_not_a_crash(tmp_path):
    (row,) = bench_train("multi30k", steps=1, warmup=0, corpus_dir=tmp_path / "nope")
    assert row["ratio"] is None and "nope" in row["note"]


def test_bad_config_is_an_error():
    result = CliRunner().invoke(cli, ["bench", "train", "--config", "big"])
    assert result.exit_code != 0 and "--config" in result.output


def test_cli_json(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "train", "--config", "multi30k", "--corpus-dir", str(tmp_path),
                                      "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["config"] == "multi30k" and row["note"]


def test_bench_extract_measures_all_three_ways():
    from qkvtrace.bench import bench_extract

    r = bench_extract("study", n_sentences=16, batch_size=8, rounds=1)
    assert r["n_sentences"] == 16 and r["n_rows"] > r["n_tokens"] > 0
    assert r["plain_s"] > 0 and r["capture_ratio"] == pytest.approx(r["capture_s"] / r["plain_s"])
    # every kind at every site and layer, d_model-wide float32 rows
    assert r["bytes_per_token"] > 4 * 64


def test_importing_the_cli_loads_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, qkvtrace.cli; heavy = [m for m in ('torch', 'sklearn', 'umap', 'matplotlib', 'plotly') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_streaming_peak_memory_is_the_childs_own():
    """Linux carries ru_maxrss over from the parent across fork + exec: a parent holding 1 GB must not make the
    child's streaming extraction look 1 GB large."""
    import numpy as np

    from qkvtrace.bench import extract_peak_memory

    held = np.ones(2**30 // 8)
    held += 1  # touch every page, so that the parent's RSS really is 1 GB
    row = extract_peak_memory("study", 16, 8)
    assert row["rows"] > 0 and row["x_mb"] > 0
    assert 0 < row["rss_before_mb"] <= row["rss_peak_mb"] < 1000
    del held
