"""Cosine tables and attention patterns against values computed by hand, and the plot / similarity / attention
commands end to end on the tiny run: files written, one-line errors, nothing overwritten without --force."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
from click.testing import CliRunner

from qkvtrace.cli import cli, main
from qkvtrace.compare import attention, similarity, write_similarity
from qkvtrace.errors import QkvtraceError
from qkvtrace.extract import extract

A, B = "we can eat apple", "apple eat can we"


def by_position(table):
    return table.rows(np.argsort(table.meta["position"], kind="stable"))


def test_similarity_equals_cosines_by_hand(tiny_run):
    tables = similarity(tiny_run, A, B, kind="k", epochs=[1, 4])
    assert [t.epoch for t in tables] == [1, 4, "4-1"]
    vectors = extract(tiny_run, [A, B], epochs=[1, 4], sites="encoder.self", kinds="k", layers="0")
    for t in tables[:2]:
        a, b = (by_position(vectors.where(epoch=t.epoch, sentence_id=i)) for i in (0, 1))
        assert t.rows == list(a.meta["token"]) == A.split() and t.cols == B.split()
        Va, Vb = a.vectors().astype(np.float64), b.vectors().astype(np.float64)
        expected = np.array([[va @ vb / np.sqrt((va @ va) * (vb @ vb)) for vb in Vb] for va in Va])
        np.testing.assert_allclose(t.matrix, expected, atol=1e-6)
    np.testing.assert_allclose(tables[2].matrix, tables[1].matrix - tables[0].matrix)
    assert tables[2].title == "cosine k · encoder.self layer 0 · change from epoch 1 to 4"
    # the printed table: one row per token of A, two decimals
    lines = tables[1].text().splitlines()
    assert len(lines) == 1 + len(A.split()) and lines[1].split()[0] == "we"
    assert lines[1].split()[1] == f"{tables[1].matrix[0, 0]:+.2f}"


def test_similarity_decoder_rows_are_transitions(tiny_run):
    (t,) = similarity(tiny_run, A, B, kind="q", site="decoder.self", epochs=[4])
    target = tiny_run.translate([A], 4)[0].text.split()
    steps = ["sos", *target]
    assert t.rows[0].startswith("sos->")
    assert t.rows == [f"{x}->{y}" for x, y in zip(steps, [*target, "eos"])]


def test_similarity_refuses_options_it_would_mix(tiny_run):
    # A table shows one kind, site and head; "k,v" used to give one table with every token twice.
    with pytest.raises(QkvtraceError, match=r"^kind 'k,v': expected one of q, k, v"):
        similarity(tiny_run, A, B, kind="k,v")
    with pytest.raises(QkvtraceError, match=r"^site 'encoder.self,decoder.self': expected one of"):
        similarity(tiny_run, A, B, site="encoder.self,decoder.self")
    with pytest.raises(QkvtraceError, match=r"^head 'all': expected one of concat, 0, 1$"):
        similarity(tiny_run, A, B, head="all")
    with pytest.raises(QkvtraceError, match=r"^epoch 3: .*epochs with checkpoints: 1, 2, 4"):
        similarity(tiny_run, A, B, epochs=[3])
    with pytest.raises(QkvtraceError, match=r"^site 'decoder': expected one of"):
        attention(tiny_run, "i can eat apple", site="decoder")


def test_write_similarity_keeps_existing_files_unless_asked(tmp_path, tiny_run):
    tables = similarity(tiny_run, A, B, kind="k", epochs=[4])
    paths = write_similarity(tables, tmp_path)
    assert sorted(p.name for p in paths) == ["similarity-k-encoder.self-L0-e4" + e for e in (".csv", ".md", ".png")]
    (tmp_path / "other.txt").write_text("kept")
    paths[0].write_text("mine")
    with pytest.raises(QkvtraceError, match="already exists; pass force=True"):
        write_similarity(tables, tmp_path, overwrite=False)
    assert paths[0].read_text() == "mine"
    write_similarity(tables, tmp_path)
    assert paths[0].read_text().startswith(",apple,eat,can,we")


def test_attention_cross_axes(tiny_run):
    pats = attention(tiny_run, "i can eat apple", epochs=[1, 4], site="decoder.cross")
    assert pats.key_tokens == ["<sos>", "i", "can", "eat", "apple", "<eos>"]  # the source on the key axis
    assert pats.query_tokens[0].startswith("sos->")  # the target, by transition, on the query axis
    assert all(p.shape == (2, len(pats.query_tokens), len(pats.key_tokens)) for p in pats.patterns)
    np.testing.assert_allclose(pats.patterns[1].sum(axis=-1), 1.0, atol=1e-5)
    fig = pats.figure()
    assert fig.axes[0].get_ylabel() == "query: target (input->next) token"
    assert fig.axes[2].get_xlabel() == "key: source token"
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 4 and {(im.norm.vmin, im.norm.vmax) for im in images} == {(0.0, 1.0)}


# --- the commands ---

def run_main(capsys, *args):
    """main() with `args`: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, *args):
    code, _, err = run_main(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def vectors_dir(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors") / "eat"
    extract(tiny_run, ["we want to eat apple", "we want to eat bread"], words="eat", kinds="q,k,v,x1",
            sites="encoder.self", out=out, load=False)
    return out


@pytest.mark.parametrize("command", ["plot", "similarity", "attention"])
def test_help(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "--force" in res.output


def test_plot_command_writes_once_and_refuses_to_overwrite(capsys, tmp_path, vectors_dir):
    out = tmp_path / "eat.svg"
    code, stdout, _ = run_main(capsys, "plot", vectors_dir, "--trajectories", "--out", out)
    assert code == 0 and stdout == f"wrote {out}\n"
    svg = out.read_text()
    assert ">eat@x1@4<" in svg and "encoder.self · layer 0 · q, k, v, x1 · epochs 1, 2, 4 · PCA" in svg
    out.write_text("mine")
    err = one_line_error(capsys, "plot", vectors_dir, "--out", out)
    assert "already exists; pass --force" in err and out.read_text() == "mine"
    assert run_main(capsys, "plot", vectors_dir, "--out", out, "--force")[0] == 0
    assert out.read_text().startswith("<?xml")


@pytest.mark.parametrize("args,message", [
    (["--where", "colour=red"], "--where colour=...: unknown column 'colour'; columns are: epoch"),
    (["--where", "kind=zz"], "--where kind=zz: matches no row; kind has: k, q, v, x1"),
    (["--label", "{colour}"], "--label '{colour}': bad field 'colour'; fields are: word, epoch"),
    (["--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295"),
    (["--out", "fig.jpg"], "unsupported extension '.jpg'"),
    (["--dims", "4"], "--dims 4: must be 2 or 3"),
    (["--method", "tsne", "--where", "kind=q", "--where", "epoch=4"], "tsne needs at least 5 points; the selection has 2"),
    (["--method", "umap", "--frame", "procrustes", "--where", "kind=q"], "epoch 1 has 2 points and umap needs at least 4"),
])
def test_plot_command_bad_input(capsys, monkeypatch, tmp_path, vectors_dir, args, message):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "plot", vectors_dir, *args, *([] if "--out" in args else ["--out", "fig.png"]))
    assert message in err
    assert not list(tmp_path.iterdir())


def test_similarity_and_attention_commands(capsys, tmp_path, tiny_run):
    tables = tmp_path / "tables"
    code, stdout, _ = run_main(capsys, "similarity", tiny_run.path, A, B, "--epochs", "1,4", "--out", tables)
    assert code == 0 and "change from epoch 1 to 4" in stdout and "wrote 9 files" in stdout
    err = one_line_error(capsys, "similarity", tiny_run.path, A, B, "--epochs", "1,4", "--out", tables)
    assert "already exists; pass --force" in err
    assert run_main(capsys, "similarity", tiny_run.path, A, B, "--epochs", "1,4", "--out", tables, "--force")[0] == 0
    assert "give one of them" in one_line_error(capsys, "similarity", tiny_run.path, A, B, "--epoch", "4",
                                                  "--epochs", "1,4")

    fig = tmp_path / "attention.png"
    assert run_main(capsys, "attention", tiny_run.path, "i can eat apple", "--epochs", "1,4", "--out", fig)[0] == 0
    before = fig.read_bytes()
    err = one_line_error(capsys, "attention", tiny_run.path, "i can eat apple", "--out", fig)
    assert "already exists; pass --force" in err and fig.read_bytes() == before
    assert "unsupported extension" in one_line_error(capsys, "attention", tiny_run.path, "i can eat apple",
                                                     "--out", tmp_path / "a.jpg")
