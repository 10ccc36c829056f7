import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from qkvtrace.cli import cli
from qkvtrace.config import ModelConfig, TrainConfig
from qkvtrace.errors import QkvtraceError
from qkvtrace.model import CpuAttention, Transformer, keep_mask
from qkvtrace.train import Run, read_safetensors, train


def test_hook_names_are_module_paths():
    m = Transformer(ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32), 10, 12)
    attn = ["hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_attn_out"]
    expected = ([f"encoder.layers.0.self_attn.{h}" for h in attn] + ["encoder.layers.0.hook_out"]
                + [f"decoder.layers.0.self_attn.{h}" for h in attn]
                + [f"decoder.layers.0.cross_attn.{h}" for h in attn] + ["decoder.layers.0.hook_out"])
    assert m.hook_names() == expected
    modules = dict(m.named_modules())
    assert all(name in modules for name in expected)


def test_training_fast_path_computes_what_the_captured_path_computes():
    """Training takes fused q/k/v projections, scaled_dot_product_attention and the fused chunked loss; evaluation
    and capture take the explicit, hooked path and plain cross-entropy. The vectors we capture describe the trained
    model only if both compute the same loss and the same gradients, with padded sources (encoder and cross masks),
    padded targets (the causal mask alone) and unpadded rows in one batch."""
    m = Transformer(ModelConfig(d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0), 20, 25, seed=1)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 20, (5, 9), generator=g)
    tgt = torch.randint(4, 25, (5, 7), generator=g)
    tgt[:, 0] = 1
    tgt[2, 4:] = 0
    src[1, 6:] = 0
    src[3, 2:] = 0

    def loss_and_grads(train: bool):
        m.train(train)
        m.zero_grad()
        loss = m.loss(src, tgt)[0]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    fast_loss, fast = loss_and_grads(True)
    explicit_loss, explicit = loss_and_grads(False)
    assert abs(fast_loss.item() - explicit_loss.item()) < 1e-5
    for name in fast:
        torch.testing.assert_close(fast[name], explicit[name], atol=1e-5, rtol=1e-4, msg=name)


def test_loss_ignores_padding():
    m = Transformer(ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0), 20, 25).eval()
    src = torch.tensor([[1, 5, 6, 2]])
    tgt = torch.tensor([[1, 7, 8, 2]])
    padded_tgt = torch.tensor([[1, 7, 8, 2, 0, 0]])
    a, n_a, _ = m.loss(src, tgt)
    b, n_b, _ = m.loss(src, padded_tgt)
    assert n_a == n_b == 3
    assert torch.allclose(a, b, atol=1e-6)


def test_run_directory_layout(tiny_run):
    d = tiny_run.path
    info = json.loads((d / "run.json").read_text())
    assert info["complete"] is True
    assert info["train"]["checkpoints"] == [1, 2, 4]
    assert info["corpus"]["content_hash"] and info["vocab"]["src"] == len(tiny_run.src_vocab)
    assert {"torch", "qkvtrace"} <= set(info["versions"])
    assert tiny_run.checkpoint_epochs() == [1, 2, 4]
    assert (d / "checkpoints" / "resume-004.safetensors").is_file() and info["resume"]["epoch"] == 4
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "val_ppl", "val_token_acc", "val_exact_match", "val_bleu", "seconds",
                "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert not list(d.rglob("*.tmp-*")), "temporary files left behind"


def test_checkpoint_holds_no_pickle_and_resume_holds_optimizer(tiny_run):
    tensors, meta = read_safetensors(tiny_run.path / "checkpoints" / "resume-004.safetensors")
    assert meta["epoch"] == "4"
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in tensors)
    weights, meta = read_safetensors(tiny_run.path / "checkpoints" / "epoch-002.safetensors")
    assert meta["epoch"] == "2" and not any(k.startswith("optim.") for k in weights)


def test_same_seed_same_weights(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    cfg = replace(cfg, epochs=2, checkpoints=(2,))
    a = train(model, cfg, tmp_path / "a")
    b = train(model, cfg, tmp_path / "b")
    c = train(model, replace(cfg, seed=1), tmp_path / "c")
    wa, wb, wc = (read_safetensors(r.path / "checkpoints" / "epoch-002.safetensors")[0] for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    model = replace(model, dropout=0.2)  # dropout makes RNG state matter
    full = train(model, cfg, tmp_path / "full")

    def kill_in_epoch_3(event):
        if event["event"] == "step" and event["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, cfg, tmp_path / "cut", progress=kill_in_epoch_3)
    with pytest.raises(QkvtraceError, match="already exists"):
        train(model, cfg, tmp_path / "cut")
    resumed = train(model, cfg, tmp_path / "cut", resume=True)
    for epoch in (1, 2, 4):
        a = read_safetensors(full.path / "checkpoints" / f"epoch-{epoch:03d}.safetensors")[0]
        b = read_safetensors(resumed.path / "checkpoints" / f"epoch-{epoch:03d}.safetensors")[0]
        assert all(torch.equal(a[k], b[k]) for k in a), epoch
    rows = (resumed.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4]


def test_resume_refuses_changed_options(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    train(model, replace(cfg, epochs=1, checkpoints=(1,)), tmp_path / "r")
    with pytest.raises(QkvtraceError, match="differ"):
        train(replace(model, d_model=32), replace(cfg, epochs=1, checkpoints=(1,)), tmp_path / "r", resume=True)


def test_corrupt_checkpoint_is_one_line_error(tmp_path, tiny_run, qkvtrace_cli):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    ckpt = copy / "checkpoints" / "epoch-004.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: 200])
    with pytest.raises(QkvtraceError, match="truncated or corrupt"):
        Run(copy).model(4)
    r = qkvtrace_cli("translate", str(copy), "i can eat apple", "--epoch", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "epoch-004.safetensors" in r.stderr


def test_translate_lists_existing_epochs(tiny_run):
    with pytest.raises(QkvtraceError, match="epochs with checkpoints: 1, 2, 4"):
        tiny_run.translate(["i can eat apple"], epoch=3)
    out = tiny_run.translate(["i can eat apple", "we drink zebra"], epoch=4)
    assert out[0].epoch == 4 and out[0].tokens and all(isinstance(t, str) for t in out[0].tokens)
    assert out[1].unknown == ["zebra"]


def test_translate_cli(tiny_run):
    res = CliRunner().invoke(cli, ["translate", str(tiny_run.path), "i can eat apple", "--json"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.splitlines()[0])
    assert line["epoch"] == 4 and line["source"] == "i can eat apple"


@pytest.mark.parametrize("args, needle", [
    (["--checkpoints", "1,40", "--epochs", "30"], "--checkpoints 1,40"),
    (["--checkpoints", "15,1"], "--checkpoints 15,1"),
    (["--checkpoints", "x"], "--checkpoints 'x'"),
    (["--d-model", "30"], "--d-model 30"),
    (["--corpus", "missing.tsv"], "missing.tsv"),
    (["--resume"], "--resume"),
    (["--checkpoints", "1,,3", "--epochs", "3"], "--checkpoints '1,,3'"),
    (["--checkpoints", "", "--epochs", "3"], "--checkpoints ''"),
    (["--lr", "nan"], "--lr nan"),
])
def test_train_bad_options_exit_nonzero_one_line(tmp_path, args, needle, qkvtrace_cli):
    r = qkvtrace_cli("train", "--run-dir", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert needle in r.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_train_refuses_existing_run_without_resume_or_force(tiny_run, qkvtrace_cli):
    before = (tiny_run.path / "run.json").read_bytes()
    r = qkvtrace_cli("train", "--run-dir", str(tiny_run.path), "--epochs", "1")
    assert r.returncode == 2 and "--resume" in r.stderr and "--force" in r.stderr
    assert (tiny_run.path / "run.json").read_bytes() == before


def test_config_file_and_cli_precedence(tmp_path, tiny_tsv, qkvtrace_cli):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nd_model = 16\nn_heads = 2\nn_layers = 1\nd_ff = 16\n[train]\ncorpus = "{tiny_tsv}"\n'
                   'epochs = 2\nbatch_size = 4\n')
    res = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--epochs", "1", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["train"]["epochs"] == 1 and info["model"]["d_model"] == 16 and info["train"]["checkpoints"] == [1]
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    r = qkvtrace_cli("train", "--config", str(bad), "--run-dir", str(tmp_path / "r2"))
    assert r.returncode == 2 and "unknown key 'epoch'" in r.stderr and "epochs" in r.stderr
    bad.write_text("[train]\nepochs = = 3\n")
    r = qkvtrace_cli("train", "--config", str(bad), "--run-dir", str(tmp_path / "r2"))
    assert r.returncode == 2 and f"{bad}:2:" in r.stderr


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("command", [(), *_commands(cli)], ids=lambda c: " ".join(c) or "qkvtrace")
def test_every_command_has_help_with_an_example(command):
    res = CliRunner().invoke(cli, [*command, "--help"])
    assert res.exit_code == 0 and res.output.startswith("Usage: ")
    group = cli
    for name in command:
        group = group.commands[name]
    if hasattr(group, "commands"):  # a group's help lists each of its commands
        assert all(f"  {name} " in res.output for name in group.commands)
    else:
        assert "Example:" in res.output


def test_resume_without_a_finished_epoch_points_to_force(tmp_path, tiny_configs):
    model, cfg = tiny_configs

    def kill_in_epoch_1(event):
        if event["event"] == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, cfg, tmp_path / "r", progress=kill_in_epoch_1)
    with pytest.raises(QkvtraceError, match="no epoch finished.*with force=True") as e:
        train(model, cfg, tmp_path / "r", resume=True)
    assert "without resume" not in str(e.value)  # that would only say "already exists" again


def test_bare_resume_takes_the_run_options(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    cfg = replace(cfg, epochs=2, checkpoints=(1, 2))

    def kill_in_epoch_2(event):
        if event["event"] == "step" and event["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, cfg, tmp_path / "r", progress=kill_in_epoch_2)
    res = CliRunner().invoke(cli, ["train", "--run-dir", str(tmp_path / "r"), "--resume"])
    assert res.exit_code == 0, res.output
    assert Run(tmp_path / "r").checkpoint_epochs() == [1, 2]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["complete"] is True
    res = CliRunner().invoke(cli, ["train", "--run-dir", str(tmp_path / "r"), "--resume", "--d-model", "32"])
    assert isinstance(res.exception, QkvtraceError) and "d_model 32 here, 16 in the run" in str(res.exception)


def test_corrupt_resume_checkpoint_is_one_line_error_and_nothing_changes(tmp_path, tiny_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    ckpt = copy / "checkpoints" / "resume-004.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: 300])
    before = {f: f.read_bytes() for f in copy.rglob("*") if f.is_file()}
    model, cfg = tiny_run.model_cfg, tiny_run.train_cfg
    with pytest.raises(QkvtraceError, match="truncated or corrupt") as e:
        train(model, cfg, copy, resume=True)
    assert "with force=True" in str(e.value) and "resume=" not in str(e.value)  # resuming cannot repair it
    assert {f: f.read_bytes() for f in copy.rglob("*") if f.is_file()} == before


def test_checkpoint_of_another_shape_names_the_tensor(tmp_path, tiny_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    info = json.loads((copy / "run.json").read_text())
    info["model"]["d_ff"] = 64
    (copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(QkvtraceError, match=r"epoch-004.safetensors: does not fit the model in run.json "
                                            r"\(size mismatch for encoder\.layers\.0\.ff\.fc1\.weight"):
        Run(copy).model(4)


@pytest.mark.parametrize("name, text, needle", [
    ("run.json", "[]", "run.json: unreadable run description"),
    ("src_vocab.json", '{"itos": 5}', "src_vocab.json: not a qkvtrace vocabulary file"),
    ("tgt_vocab.json", '{"itos": ["a", "b"]}', "tgt_vocab.json: vocabulary must start with <pad>"),
])
def test_damaged_run_files_are_one_line_errors(tmp_path, tiny_run, name, text, needle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    (copy / name).write_text(text)
    with pytest.raises(QkvtraceError, match=needle):
        Run(copy)


def test_damaged_metrics_line_is_one_line_error(tmp_path):
    from qkvtrace.train import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "tr\n')
    with pytest.raises(QkvtraceError, match=r"metrics.jsonl:2: not a metrics line"):
        read_metrics(tmp_path)


def test_no_validation_pair_gives_nan_not_a_perfect_score(tmp_path, tiny_configs):
    import math

    model, cfg = tiny_configs
    one = tmp_path / "one.tsv"
    one.write_text("i eat bread\tich esse brot\n")
    run = train(model, replace(cfg, corpus=str(one), epochs=1, checkpoints=(1,)), tmp_path / "r")
    row = json.loads((run.path / "metrics.jsonl").read_text())
    assert all(math.isnan(row[k]) for k in ("val_loss", "val_ppl", "val_token_acc", "val_exact_match", "val_bleu"))


def test_run_dir_that_is_a_file(tmp_path, tiny_configs):
    model, cfg = tiny_configs
    f = tmp_path / "f"
    f.write_text("mine")
    for run_dir in (f, f / "sub"):
        with pytest.raises(QkvtraceError, match="^run_dir .*: exists and is not a directory|^run_dir .*: cannot (create|write)"):
            train(model, cfg, run_dir)
    assert f.read_text() == "mine"


def test_translate_bad_input(tiny_run):
    runner = CliRunner()
    res = runner.invoke(cli, ["translate", str(tiny_run.path), "i can eat apple", "--epoch", "1", "--epochs", "1,2"])
    assert isinstance(res.exception, QkvtraceError) and "give one of them" in str(res.exception)
    res = runner.invoke(cli, ["translate", str(tiny_run.path), "i can eat apple", "--epochs", "1,,4"])
    assert isinstance(res.exception, QkvtraceError) and "--epochs '1,,4'" in str(res.exception)
    with pytest.raises(QkvtraceError, match="empty; give a sentence with at least one word"):
        tiny_run.translate(["  "])


def test_bad_lr_and_clip():
    for kwargs in ({"lr": float("nan")}, {"lr": float("inf")}, {"clip": 0.0}, {"clip": float("nan")}):
        with pytest.raises(ValueError, match="positive finite"):
            TrainConfig(**kwargs)


def test_force_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_configs):
    from qkvtrace.train import train

    folder = tmp_path / "papers"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "thesis.tex").write_text("mine")
    (folder / "checkpoints" / "model.safetensors").write_bytes(b"mine")
    model, train_cfg = tiny_configs
    with pytest.raises(QkvtraceError, match=r"not a qkvtrace run \(holds thesis.tex\)"):
        train(model, train_cfg, folder, force=True)
    assert (folder / "thesis.tex").read_text() == "mine"
    assert (folder / "checkpoints" / "model.safetensors").read_bytes() == b"mine"


@pytest.mark.parametrize("args, needle", [
    (["plot", "x", "--method", "mds"], "'--method': 'mds' is not one of"),
    (["train", "--epochs", "x"], "'--epochs': 'x' is not a valid integer"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_click_usage_errors_are_one_line(args, needle, qkvtrace_cli):
    r = qkvtrace_cli(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "--help" in r.stderr


@pytest.mark.parametrize("chunk_elements", [1, 5 * 11, 1 << 23])  # one row a chunk, uneven chunks, one chunk
def test_fused_linear_cross_entropy_matches_plain_loss_and_gradients(chunk_elements):
    import torch.nn.functional as F

    from qkvtrace.model import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    gold = torch.randint(11, (37,), generator=g)
    plain = F.cross_entropy(F.linear(hidden, weight, bias), gold)
    fused = linear_cross_entropy(hidden, weight, bias, gold, chunk_elements=chunk_elements)
    assert torch.allclose(fused, plain, rtol=0, atol=1e-12)
    # An upstream factor checks that backward scales by grad_output, not just by 1/N.
    for a, b in zip(torch.autograd.grad(2.5 * plain, (hidden, weight, bias)),
                    torch.autograd.grad(2.5 * fused, (hidden, weight, bias))):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_norm", [0.1, 1e6])  # clipped, and left alone
def test_clip_grad_norm_is_torchs_bit_for_bit(max_norm):
    from qkvtrace.train import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(4)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    assert torch.equal(clip_grad_norm(ours, max_norm), torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


def test_replaced_tensor_bytes_and_a_missing_newest_checkpoint_are_named(tmp_path, tiny_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    ckpt = copy / "checkpoints" / "epoch-004.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-64:] = bytes(64)  # same size, same header: only tensor values differ
    ckpt.write_bytes(bytes(data))
    with pytest.raises(QkvtraceError, match=r"epoch-004.safetensors: damaged or replaced: sha256 \w{12}, run.json "
                                            r"recorded \w{12}; train the run again with force=True"):
        Run(copy).translate(["i can eat apple"])
    ckpt.unlink()
    with pytest.raises(QkvtraceError, match=r"epoch-004.safetensors: the checkpoint of epoch 4 is missing"):
        Run(copy).translate(["i can eat apple"])  # not a silent fallback to epoch 2
    assert Run(copy).translate(["i can eat apple"], epoch=2)[0].epoch == 2


def test_cpu_attention_with_dropout_equals_its_recorded_ops():
    """CpuAttention (training on CPU with dropout) against the same arithmetic recorded op by op, with the same
    dropout mask: padded keys (encoder and cross-attention) and the causal mask, outputs and all three gradients."""
    B, Tq, Tk, H, D = 3, 5, 7, 2, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, Tk, H * D, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[1, ..., 4:] = False
    pad[2, ..., 1:] = False
    for mask, causal, (tq, tk) in ((pad, False, (Tq, Tk)), (None, True, (Tk, Tk))):
        inputs = [t.clone().requires_grad_() for t in (q[:, :tq], k[:, :tk], v[:, :tk])]
        torch.manual_seed(3)
        z = CpuAttention.apply(*inputs, mask, causal, 0.25, H)
        z.backward(torch.ones_like(z))

        ref = [t.clone().requires_grad_() for t in (q[:, :tq], k[:, :tk], v[:, :tk])]
        qh, kh, vh = (t.view(B, -1, H, D).transpose(1, 2) for t in ref)  # (batch, head, pos, d_head)
        scores = qh @ kh.transpose(-1, -2) / D ** 0.5
        allowed = torch.ones(tq, tk, dtype=torch.bool).tril() if causal else mask
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        torch.manual_seed(3)
        keep = keep_mask(pattern.detach().reshape(B * H, tq, tk), 0.25).view(B, H, tq, tk)
        assert 0.15 < float((keep == 0).double().mean()) < 0.35 and set(keep.unique().tolist()) == {0.0, 4 / 3}
        expect = ((pattern * keep) @ vh).transpose(1, 2).reshape(B, tq, H * D)
        expect.backward(torch.ones_like(expect))
        torch.testing.assert_close(z, expect)
        for name, a, b in zip("qkv", inputs, ref):
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_keep_mask_drops_at_rate_p_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(400_001)
    for p in (0.1, 0.5):
        keep = keep_mask(x, p)
        assert keep.shape == x.shape
        assert abs(float((keep == 0).float().mean()) - p) < 0.003
        assert abs(float(keep.mean()) - 1.0) < 0.01
    assert float(keep_mask(x, 0.0).min()) == 1.0
