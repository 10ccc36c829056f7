"""Bad input across commands, by class: every case is one line `error: ...` naming the option or value and what is
right, exit code 2, and nothing written. Found by a sweep of about 300 bad inputs over every command; the classes
here are the ones that crashed, hung, printed several lines or were accepted."""

import pytest

from tests.conftest import PAIRS

RANGE = "is not in the range"


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


# Seeds reach numpy/scikit-learn (0..2**32-1); counts of rounds, steps, sentences and neighbours are at least 1.
# Before: tracebacks (train/plot --seed -1, bench extract --rounds 0), a hang (bench extract --sentences -1) or a
# 2 TiB allocation (view --neighbours 1000000000, see test_neighbours_beyond_the_table_are_clamped).
@pytest.mark.parametrize("args,message", [
    (["train", "--seed", "-1"], f"'--seed': -1 {RANGE} 0<=x<=4294967295"),
    (["train", "--seed", "99999999999999999999"], f"'--seed': 99999999999999999999 {RANGE} 0<=x<=4294967295"),
    (["plot", "vectors", "--seed", "-1"], f"'--seed': -1 {RANGE} 0<=x<=4294967295"),
    (["view", "vectors", "--seed", "4294967296"], f"'--seed': 4294967296 {RANGE} 0<=x<=4294967295"),
    (["corpus", "builtin", "--seed", "-2"], f"'--seed': -2 {RANGE} 0<=x<=4294967295"),
    (["view", "vectors", "--neighbours", "0"], f"'--neighbours': 0 {RANGE} x>=1"),
    (["bench", "extract", "--sentences", "-1"], f"'--sentences': -1 {RANGE} x>=1"),
    (["bench", "extract", "--rounds", "0"], f"'--rounds': 0 {RANGE} x>=1"),
    (["bench", "train", "--steps", "0"], f"'--steps': 0 {RANGE} x>=1"),
    (["bench", "precision", "--warmup", "-1"], f"'--warmup': -1 {RANGE} x>=0"),
    (["bench", "precision", "--precisions", "fp32,fp32"], "--precisions 'fp32,fp32': expected a comma-separated "
                                                           "list of distinct fp32, bf16, fp16"),
    (["study", "--seeds", "0,-1"], "--seeds 0,-1: expected distinct seeds in 0..4294967295"),
    (["corpus", "fetch", "bogus"], "Invalid value for 'NAME': 'bogus' is not 'multi30k'"),
])
def test_ranges_and_choices(qkvtrace_cli, tmp_path, args, message):
    err = one_line_error(qkvtrace_cli(*args, cwd=tmp_path))
    assert message in err
    assert not list(tmp_path.iterdir())


# An empty path meant the current directory (train --run-dir "" trained into it) or the default (extract --out "").
@pytest.mark.parametrize("args,name", [
    (["train", "--run-dir", ""], "--run-dir"), (["extract", "run", "-s", "i eat", "--out", ""], "--out"),
    (["plot", "vectors", "--out", ""], "--out"), (["translate", "", "i eat"], "MODEL"),
    (["study", "--model", ""], "--model"), (["run", "x.toml", "--cache", ""], "--cache"),
    (["corpus", ""], "SPEC"), (["corpus", "fetch", "multi30k", "--to", ""], "--to"),  # the corpus group's commands
])
def test_empty_paths(qkvtrace_cli, tmp_path, args, name):
    assert f"error: {name} '': empty; give a file or folder name" in one_line_error(qkvtrace_cli(*args, cwd=tmp_path))
    assert not list(tmp_path.iterdir())


def test_seed_in_a_config_file(qkvtrace_cli, tmp_path, tiny_tsv):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 1\nseed = -1\n")
    err = one_line_error(qkvtrace_cli("train", "--corpus", tiny_tsv, "--config", config, "--run-dir", tmp_path / "r"))
    assert f"{config}:3: [train] seed -1: must be a whole number in 0..4294967295" in err
    assert not (tmp_path / "r").exists()


def test_resume_of_a_run_that_does_not_exist(qkvtrace_cli, tmp_path, tiny_tsv):
    err = one_line_error(qkvtrace_cli("train", "--corpus", tiny_tsv, "--epochs", "1", "--run-dir", tmp_path / "new",
                                      "--resume"))
    assert f"--resume: {tmp_path / 'new'} is not a run (no run.json) and there is nothing to resume" in err
    assert not list(tmp_path.iterdir())


# An epoch given twice: translate and similarity refused it, extract wrote the rows twice, attention drew a column
# twice (and failed on the repeated checkpoint's translation); an empty --target was read as "no target".
@pytest.mark.parametrize("args,message", [
    (["extract", "{run}", "-s", "i can eat apple", "--epochs", "1,1", "--out", "v"],
     "--epochs 1,1: epoch 1 given more than once; give each epoch once"),
    (["attention", "{run}", "i can eat apple", "--epochs", "2,1,2", "--out", "a.png"],
     "--epochs 2,1,2: epoch 2 given more than once"),
    (["attention", "{run}", "i can eat apple", "--target", " ", "--out", "a.png"],
     "--target ' ': empty; give the translation to teacher-force"),
])
def test_repeated_epochs_and_empty_target(qkvtrace_cli, tmp_path, tiny_run, args, message):
    args = [str(tiny_run.path) if a == "{run}" else a for a in args]
    assert message in one_line_error(qkvtrace_cli(*args, cwd=tmp_path))
    assert not list(tmp_path.iterdir())


def test_similarity_refuses_a_run_directory_as_out(qkvtrace_cli, tmp_path, tiny_run):
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "run.json").write_text("{}")
    err = one_line_error(qkvtrace_cli("similarity", tiny_run.path, "i can eat apple", "i eat bread", "--out", other))
    assert f"--out {other}: a run directory; write the tables to a folder of their own" in err
    assert [p.name for p in other.iterdir()] == ["run.json"]


def test_a_translation_cut_at_max_len_is_teacher_forced_as_far_as_it_fits(tiny_run, monkeypatch):
    """attention on a decoder site takes the newest checkpoint's translation as the target; one that ran to max_len
    without <eos> has no room for <sos>/<eos> and was refused as if the user had typed it ("shorten it")."""
    from types import SimpleNamespace

    from qkvtrace.compare import attention

    max_len = tiny_run.model_cfg.max_len
    runaway = " ".join([PAIRS[0][1].split()[0]] * (max_len - 1))
    monkeypatch.setattr(tiny_run, "translate", lambda sentences, epoch=None, device="cpu":
                        [SimpleNamespace(text=runaway) for _ in sentences])
    pats = attention(tiny_run, "i can eat apple", epochs=[1, 2])
    assert len(pats.query_tokens) == max_len - 1  # <sos> + max_len - 2 words, then <eos>
    assert [p.shape[1] for p in pats.patterns] == [max_len - 1] * 2


def test_neighbours_beyond_the_table_are_clamped(tiny_run, tmp_path):
    from qkvtrace.extract import extract
    from qkvtrace.web import explorer_data

    table = extract(tiny_run, ["i can eat apple"], kinds="q", sites="encoder.self", epochs=[1])
    data = explorer_data(table, methods=("pca",), k=10**6, qk_joint=False)
    assert data["k"] == len(table) - 1


def test_hf_reference_without_network_is_one_line(qkvtrace_cli, tmp_path, monkeypatch):
    """Not cached and no network: one line saying so at once, instead of huggingface_hub's retry lines (~25 s)."""
    pytest.importorskip("transformers")
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    err = one_line_error(qkvtrace_cli("translate", "hf:nobody/nothing", "hello"))
    assert ("hf:nobody/nothing: not in the local Hugging Face cache, and huggingface.co cannot be reached (offline); "
            "download it once with network access, or pass a local folder written by save_pretrained") in err
