"""Mixed precision: bf16 autocast on CPUs that have it, fp16 refused on CPU in one line."""

import json
from dataclasses import replace

import pytest
import torch

from qkvtrace.cli import main
from qkvtrace.model import linear_cross_entropy
from qkvtrace.train import cpu_has_bf16, read_safetensors, train


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bfloat16 instructions")
def test_bf16_run_trains_and_keeps_fp32_weights(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    run = train(model, replace(cfg, precision="bf16", epochs=2, checkpoints=(2,)), tmp_path / "bf16")
    info = json.loads((run.path / "run.json").read_text())
    assert info["train"]["precision"] == "bf16" and info["precision"] == "bf16"
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    weights = read_safetensors(run.path / "checkpoints" / "epoch-002.safetensors")[0]
    assert all(t.dtype == torch.float32 for t in weights.values())  # autocast computes in bf16, keeps fp32 weights


def test_fused_loss_under_bf16_autocast_is_computed_in_fp32():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(30, generator=g)
    gold = torch.randint(0, 30, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden.bfloat16(), weight, bias, gold)
    assert loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(hidden.bfloat16().float() @ weight.T + bias, gold)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_fp16_on_cpu_is_one_line_error(tmp_path, tiny_tsv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--corpus", str(tiny_tsv), "--device", "cpu", "--precision", "fp16",
              "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --precision fp16: needs a CUDA device")
    assert not (tmp_path / "r").exists()


def test_bench_precision_rows_and_bad_list(capsys):
    from qkvtrace.bench_scale import bench_precision

    rows = bench_precision("study", ("fp32",), steps=1, warmup=0, rounds=1)
    assert [r["precision"] for r in rows] == ["fp32"] and rows[0]["speedup"] == 1.0 and rows[0]["ms_per_step"] > 0
    with pytest.raises(SystemExit) as e:
        main(["bench", "precision", "--precisions", "fp32,fp8"])
    assert e.value.code == 2 and "--precisions 'fp32,fp8'" in capsys.readouterr().err


def test_bench_precision_runs_trains_a_subset_and_reports_bleu(tmp_path, capsys):
    from tests.conftest import PAIRS, TINY_MODEL

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, pairs in (("train", PAIRS[:9]), ("val", PAIRS[9:])):
        for lang, i in (("en", 0), ("de", 1)):
            (corpus / f"{split}.{lang}").write_text("".join(p[i] + "\n" for p in pairs))
    toml = tmp_path / "exp.toml"
    model = "".join(f"{k} = {v!r}\n" for k, v in TINY_MODEL.items())
    toml.write_text(f'[corpus]\nspec = "x"\nmin_freq = 1\n[model]\n{model}[train]\nepochs = 3\ncheckpoints = [1, 3]\n'
                    "batch_size = 4\n")
    out = tmp_path / "out"
    main(["bench", "precision-runs", str(toml), "--corpus-dir", str(corpus), "--pairs", "6", "--val-pairs", "2",
          "--epochs", "1", "--precisions", "fp32", "--out", str(out), "--json"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["precision"] == "fp32" and row["pairs"] == 6 and row["epochs"] == 1 and row["steps"] == 2
    assert row["speedup"] == 1.0 and row["ms_per_step"] > 0 and 0 <= row["bleu"] <= 100
    assert len((out / "corpus" / "train.en").read_text().splitlines()) == 6
    assert len((out / "corpus" / "val.de").read_text().splitlines()) == 2
    assert [json.loads(line)["epoch"] for line in (out / "fp32" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_bench_train_memory_reports_the_childs_peak(tmp_path, capsys):
    from qkvtrace.bench_scale import synthetic_corpus

    a, b = synthetic_corpus(tmp_path / "a", 50, 5), synthetic_corpus(tmp_path / "b", 50, 5)
    assert (a / "train.de").read_text() == (b / "train.de").read_text()  # seeded
    assert [len((a / f).read_text().splitlines()) for f in ("train.en", "train.de", "val.en")] == [50, 50, 5]
    assert all(4 <= len(line.split()) <= 9 for line in (a / "train.en").read_text().splitlines())
    main(["bench", "train-memory", "--pairs", "200", "--steps", "1", "--batch-size", "50", "--out",
          str(tmp_path / "m"), "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["pairs"] == 200 and 0 < row["rss_imports_mb"] <= row["rss_ready_mb"] <= row["rss_peak_mb"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["corpus-200", "run"]


def test_cpu_attention_under_bf16_autocast_is_computed_in_fp32():
    """Under CPU autocast the written-out attention (training with dropout) runs in fp32, as torch's softmax does:
    its output is fp32 and equals the fp32 call on the same inputs, mask and dropout draws."""
    from qkvtrace.model import CpuAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = CpuAttention.apply(q, k, v, None, True, 0.1, 2)
    torch.manual_seed(1)
    expect = CpuAttention.apply(q.float(), k.float(), v.float(), None, True, 0.1, 2)
    assert z.dtype == torch.float32 and torch.equal(z, expect)
