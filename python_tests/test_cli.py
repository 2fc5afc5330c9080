"""The ``unlock-fast`` command line on tiny random-weight models saved to local folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_pair

from unlock_fast.cli import build_parser, main


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_pair(tmp_path_factory.mktemp("models"))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv + ["--no-progress"] if argv and not argv[-1].startswith("-h") else argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("cmd", ["demo", "extract", "align", "transfer", "generate", "evaluate"])
def test_help_explains_every_option(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--device", "--dtype", "--device-map", "--batch-size"):
        assert opt in text
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
    for action in sub._actions:  # every option has a help text
        assert action.help, f"{cmd} {action.option_strings} has no help"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "transfer" in capsys.readouterr().out


def test_transfer_generate_evaluate(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, stdout, _ = run(
        [
            "transfer",
            "-s",
            models["src"],
            "-t",
            models["tgt"],
            "-o",
            str(out),
            "-n",
            "6",
            "--n-heldout",
            "4",
            "--rank",
            "4",
            "--batch-size",
            "3",
        ],
        capsys,
    )
    assert code == 0
    for sub in ("direction", "alignment", "key"):
        assert (out / sub / "unlock.json").is_file()
    diag = json.loads((out / "diagnostics.json").read_text())
    assert len(diag["r2"]) == 4
    assert diag["num_rows"] == 4
    assert "centred R²" in stdout

    code, stdout, _ = run(
        [
            "generate",
            "-m",
            models["tgt"],
            "--key",
            str(out / "key"),
            "-p",
            "Tom has 3 apples.",
            "-p",
            "A box holds 6 eggs.",
            "--max-new-tokens",
            "3",
            "--compare",
            "--alpha",
            "0.5",
        ],
        capsys,
    )
    assert code == 0
    assert stdout.count("--- steered (alpha=0.5)") == 2
    assert stdout.count("--- unsteered") == 2

    rep = tmp_path / "eval"
    code, stdout, _ = run(
        [
            "evaluate",
            "-t",
            models["tgt"],
            "--key",
            str(out / "key"),
            "-n",
            "5",
            "--max-new-tokens",
            "3",
            "-o",
            str(rep),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads((rep / "report.json").read_text())
    assert [c["condition"] for c in data["conditions"]] == ["baseline", "cot", "unlock", "random"]
    assert all(c["accuracy"]["n"] == 5 for c in data["conditions"])
    items = (rep / "items.jsonl").read_text().splitlines()
    assert len(items) == 20
    assert {"prompt", "output", "extracted", "correct"} <= set(json.loads(items[0]))
    assert "random vs baseline" in stdout


def test_extract_and_align(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = run(
        [
            "extract",
            "-m",
            models["src"],
            "-o",
            str(tmp_path / "d"),
            "-n",
            "4",
            "--method",
            "pca",
            "--layers",
            "0-1",
        ],
        capsys,
    )
    assert code == 0
    assert "2 layers x 32" in stdout
    meta = json.loads((tmp_path / "d" / "unlock.json").read_text())
    assert meta["kind"] == "direction"
    assert meta["layers"] == [0, 1]
    assert meta["method"] == "pca"

    code, stdout, _ = run(
        [
            "align",
            "-s",
            models["src"],
            "-t",
            models["tgt"],
            "-o",
            str(tmp_path / "a"),
            "-n",
            "5",
            "--n-heldout",
            "0",
            "--rank",
            "3",
            "--centered",
        ],
        capsys,
    )
    assert code == 0
    assert "rank 3" in stdout
    meta = json.loads((tmp_path / "a" / "unlock.json").read_text())
    assert meta["kind"] == "alignment"
    assert meta["centered"] is True


# The grid refits its ranks at every N, and N = 3 is below rank 4 by design.
@pytest.mark.filterwarnings("ignore::unlock_fast.estimator.RankClampedWarning")
def test_grid_search_selects_on_heldout(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rep = tmp_path / "grid"
    code, stdout, _ = run(
        [
            "evaluate",
            "-t",
            models["tgt"],
            "-s",
            models["src"],
            "--ranks",
            "2,4",
            "--alphas",
            "0.1,0.5",
            "--ns",
            "3,5",
            "--n-train",
            "5",
            "--n-heldout",
            "3",
            "-n",
            "3",
            "--max-new-tokens",
            "2",
            "--conditions",
            "baseline,unlock",
            "-o",
            str(rep),
        ],
        capsys,
    )
    assert code == 0
    assert "selected on held-out" in stdout
    data = json.loads((rep / "report.json").read_text())
    assert len(data["points"]) == 2 * 2 * 2
    sel = data["selected"]
    assert sel["rank"] in (2, 4)
    assert sel["alpha"] in (0.1, 0.5)
    assert sel["n"] in (3, 5)
    assert [c["condition"] for c in data["test"]["conditions"]] == ["baseline", "unlock"]
    assert "held-out" in data["note"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "-m", "./no/such/model", "-p", "hi"], "does not exist"),
        (["generate", "-m", "{tgt}"], "at least one --prompt"),
        (
            ["generate", "-m", "{tgt}", "-p", "x", "--key", "{tmp}/nokey"],
            "not an unlock-fast artifact",
        ),
        (
            ["evaluate", "-t", "{tgt}", "--key", "k", "--conditions", "baseline,magic"],
            "--conditions",
        ),
        (["evaluate", "-t", "{tgt}"], "give --key"),
        (
            ["extract", "-m", "{src}", "-o", "{tmp}/d", "--dataset", "{tmp}/missing.jsonl"],
            "not found",
        ),
        (["transfer", "-s", "{src}", "-t", "{tgt}", "-o", "{tmp}/t", "--dtype", "int8"], "dtype"),
        (["extract", "-m", "{src}", "--gguf-file", "x.gguf", "-o", "{tmp}/d"], "GGUF file"),
    ],
)
def test_user_mistakes_are_one_line(
    argv: list[str],
    message: str,
    models: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(tgt=models["tgt"], src=models["src"], tmp=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "Traceback" not in err
    assert message in lines[0]
    assert lines[0].startswith(f"unlock-fast {argv[0]}: error:")


def test_key_for_another_model_is_refused(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(["extract", "-m", models["src"], "-o", str(tmp_path / "d"), "-n", "2"], capsys)
    assert code == 0
    code, _, err = run(
        ["generate", "-m", models["tgt"], "--key", str(tmp_path / "d"), "-p", "x"], capsys
    )
    assert code == 2
    assert "hidden size" in err
    assert "Traceback" not in err


def test_bad_option_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["extract", "-m", "x", "-o", "y", "--layers", "a-b"],
        ["evaluate", "-t", "x", "--ranks", "1,two"],
        ["demo", "--n-test", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_demo_command_with_overrides(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code, stdout, _ = run(
        ["demo", "--source", models["src"], "--target", models["tgt"], "--quick", "--n-test", "2",
         "--max-new-tokens", "2", "--alphas", "0.1,0.2", "-o", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert "# unlock-fast demo report" in stdout
    cfg = json.loads((out / "report.json").read_text())["config"]
    # --quick sizes, except what was given explicitly
    assert (cfg["n_train"], cfg["n_test"], cfg["max_new_tokens"]) == (16, 2, 2)
    assert cfg["alphas"] == [0.1, 0.2]
    assert cfg["batch_size"] == 16
