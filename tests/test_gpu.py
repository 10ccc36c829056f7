"""The CUDA path: run where a GPU is present (pytest -m gpu selects these), skipped elsewhere."""

from dataclasses import replace

import pytest
import torch

from qkvtrace.model import Transformer
from qkvtrace.train import read_safetensors, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def test_cuda_loss_equals_fused_cpu_loss_and_gradients(tiny_configs):
    model_cfg, _ = tiny_configs
    cpu = Transformer(replace(model_cfg, dropout=0.0), 30, 40, seed=3).train()
    gpu = Transformer(replace(model_cfg, dropout=0.0), 30, 40, seed=3).cuda().train()
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, 30, (6, 9), generator=g), torch.randint(4, 40, (6, 8), generator=g)
    tgt[:, 0], tgt[2, 5:] = 1, 0
    loss_cpu = cpu.loss(src, tgt)[0]  # the fused, chunked CPU loss
    loss_gpu = gpu.loss(src.cuda(), tgt.cuda())[0]  # F.cross_entropy on CUDA
    assert torch.allclose(loss_cpu, loss_gpu.cpu(), rtol=1e-4)
    loss_cpu.backward()
    loss_gpu.backward()
    assert torch.allclose(cpu.lm_head.weight.grad, gpu.lm_head.weight.grad.cpu(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_run_trains(tmp_path, tiny_configs, precision):
    model_cfg, cfg = tiny_configs
    run = train(model_cfg, replace(cfg, device="cuda", precision=precision, epochs=2, checkpoints=(2,)),
                tmp_path / precision)
    weights = read_safetensors(run.path / "checkpoints" / "epoch-002.safetensors")[0]
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert run.translate(["i can eat apple"], device="cuda")[0].tokens
