"""Shared fixtures: a dozen hand-written pairs, a tiny model config, and one tiny run trained once per session."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

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
