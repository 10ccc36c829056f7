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
