"""Every mistake on the ``unlock-fast`` command line is one line on stderr and exit status 2:
argparse's own errors, and damaged artifacts given to a command."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, word_tokenizer

from unlock_fast import ModelInfo, SteeringKey
from unlock_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line; argparse's errors and --help exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "usage:" not in err
    assert lines[0].startswith("unlock-fast")
    assert ": error: " in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "prefix", "words"),
    [
        (["magic"], "unlock-fast:", "invalid choice"),
        (["--bogus"], "unlock-fast:", "unrecognized arguments: --bogus"),
        (["extract", "-m", "x", "-o", "y", "--bogus", "1"], "unlock-fast extract:", "--bogus 1"),
        (["extract", "-o", "y"], "unlock-fast extract:", "required: --model"),
        (
            ["align", "-s", "a", "-t", "b", "-o", "c", "--rank", "abc"],
            "unlock-fast align:",
            "--rank",
        ),
        (
            ["generate", "-m", "x", "-p", "hi", "--alpha", "strong"],
            "unlock-fast generate:",
            "--alpha",
        ),
        (["generate", "-m", "x", "--template", "odd"], "unlock-fast generate:", "invalid choice"),
        (["export", "k"], "unlock-fast export:", "required"),
        (["extract", "-m", "x", "-o", "y", "--layers", "a-b"], "unlock-fast extract:", "layers"),
        (["demo", "--n-test", "0"], "unlock-fast demo:", "positive integer"),
    ],
)
def test_argparse_errors_are_one_line(
    argv: list[str], prefix: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(argv, capsys)
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith(prefix + " error:"), line
    assert words in line
    assert "--help" in line  # where to look next, on the same line


def test_no_command_is_one_line_after_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call([], capsys)
    assert code == 2
    assert "COMMAND" in out
    assert "give a COMMAND" in one_line(err)


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["--version"]])
def test_help_and_version_exit_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(argv, capsys)
    assert code == 0
    assert out
    assert err == ""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelInfo]:
    """A saved tiny model, and what a key made for it records."""
    root = tmp_path_factory.mktemp("model")
    tok = word_tokenizer()
    model = make_model("llama", len(tok), hidden=16, layers=2)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root, ModelInfo.of(model)


def _key(folder: Path, info: ModelInfo | None = None) -> Path:
    """A valid key (for the model ``info`` describes), so that only the damage is wrong."""
    info = info or ModelInfo("m", "f", 16, 2)
    SteeringKey(torch.ones(2, 16), [0, 1], info).save_pretrained(folder)
    return folder


def _damage(folder: Path, how: str) -> None:
    meta = folder / "unlock.json"
    if how == "pickle":
        (folder / "tensors.safetensors").write_bytes(pickle.dumps({"vectors": [1.0]}))
    elif how == "truncated":
        data = (folder / "tensors.safetensors").read_bytes()
        (folder / "tensors.safetensors").write_bytes(data[:-9])
    elif how == "json":
        meta.write_text('{"kind": "steering_key", ')
    elif how == "entry":
        doc = json.loads(meta.read_text())
        doc["layers"] = [1, 1]
        meta.write_text(json.dumps(doc))
    elif how == "future":
        doc = json.loads(meta.read_text())
        doc["format_version"] = 1000
        meta.write_text(json.dumps(doc))


DAMAGES = ["pickle", "truncated", "json", "entry", "future"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_artifact_to_export_is_one_line(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = _key(tmp_path / "key")
    _damage(key, how)
    code, _, err = call(["export", str(key), str(tmp_path / "cv.gguf"), "--alpha", "1"], capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("unlock-fast export: error:")
    assert str(key) in line
    assert not (tmp_path / "cv.gguf").exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_key_to_generate_is_one_line(
    how: str,
    model_dir: tuple[Path, ModelInfo],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, info = model_dir
    key = _key(tmp_path / "key", info)
    argv = ["generate", "-m", str(folder), "--key", str(key), "-p", "hi", "--no-progress"]
    argv += ["--max-new-tokens", "1"]
    assert call(argv, capsys)[0] == 0  # the key is fine before the damage
    _damage(key, how)
    code, out, err = call(argv, capsys)
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith("unlock-fast generate: error:")
    assert str(key) in line
