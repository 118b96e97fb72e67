"""Messages name options as the user wrote them: flags from the ``fastvae``
command, keywords from Python (fastvae/naming.py). A library user was told
to pass ``--batch-size`` or ``--force`` (dozens of messages outside the
command-line modules wrote flags themselves)."""

import ast
import pathlib
import re
import threading

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError, RunFolderError, TrainConfig
from fastvae.cli import main
from fastvae.naming import command_line, on_command_line, option

PKG = pathlib.Path(fastvae.__file__).parent
KERNELS = PKG.parent / "kernels"
CLI_MODULES = {"__main__.py"}      # and every module of fastvae/cli/
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_option_spells_a_flag_on_the_command_line_and_a_keyword_in_python():
    cases = [(("batch_size",), "--batch-size", "batch_size"),
             (("likelihood", "gaussian"), "--likelihood gaussian", "likelihood='gaussian'"),
             (("clip_grad_norm", 100), "--clip-grad-norm 100", "clip_grad_norm=100"),
             (("force", True), "--force", "force=True"),
             (("image_size", (64, 64)), "--image-size 64 64", "image_size=(64, 64)"),
             (("latent_dim",), "--latent", "latent_dim"),                  # the flag has another name
             (("memory_budget_mb", 0.5), "--memory-budget 0.5", "memory_budget_mb=0.5"),
             (("n", None, "grid"), "--grid", "n")]
    for args, flag, keyword in cases:
        assert option(*args) == keyword
        with command_line():
            assert option(*args) == flag
        assert option(*args) == keyword


def test_the_command_line_spelling_nests_holds_for_threads_and_ends_with_an_exception():
    assert not on_command_line()
    with pytest.raises(KeyError):
        with command_line():
            with command_line():
                assert on_command_line()
            assert on_command_line()
            seen = []                          # a thread the command starts (prefetch, Adam) writes for it too
            worker = threading.Thread(target=lambda: seen.append(option("batch_size")))
            worker.start()
            worker.join()
            assert seen == ["--batch-size"]
            raise KeyError("x")
    assert not on_command_line()


def test_one_mistake_named_each_way(tmp_path, capsys):
    """The same mistakes through fastvae.train / ModelConfig and through the
    command line (in-process, exit status 2 and one line on stderr)."""
    with pytest.raises(ConfigError, match=r"images; use a smaller batch_size$"):
        fastvae.train(n_sprites=30, batch_size=1000)
    assert main(["train", "--n-sprites", "30", "--batch-size", "1000", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.rstrip().endswith("images; use a smaller --batch-size")

    with pytest.raises(ConfigError, match=r"drop tf32 or use backend='cupy'$"):
        fastvae.RunSettings(tf32=True, backend="numpy")
    assert main(["train", "--tf32", "--n-sprites", "30", "--out", str(tmp_path / "b")]) == 2
    assert "drop --tf32 or use --backend cupy" in capsys.readouterr().err

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"^out='.*' holds files that are not from a fastvae run \(notes.txt\); "
                                             r"choose another folder or pass force=True$"):
        fastvae.train(np.zeros((20, 4, 4)), out=str(tmp_path / "c"), epochs=1)
    assert main(["train", "--n-sprites", "30", "--out", str(tmp_path / "c")]) == 2
    assert re.search(r"--out .* not from a fastvae run \(notes.txt\); choose another folder or pass --force$",
                     capsys.readouterr().err.rstrip())
    assert not on_command_line()                        # main() leaves the spelling as it found it


def _message_strings(tree):
    """Every string constant (f-string parts included) in a raise, a print,
    a ``preflight`` fix, a ``_finite_nonneg``/``_choice`` name or a returned
    message: what a user reads."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            roots = [node.exc]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "print", "preflight", "_finite_nonneg", "_choice"):
            roots = node.args
        elif isinstance(node, ast.Return) and node.value is not None:
            roots = [node.value]
        else:
            continue
        for root in roots:
            for sub in ast.walk(root):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


def test_no_library_message_spells_a_flag_itself():
    """Outside the command-line modules, messages name options through
    ``option()``: no string a user reads holds a flag written out (the test
    finds the ones this change converted when they are put back)."""
    found = []
    for path in sorted(PKG.rglob("*.py")) + sorted(KERNELS.rglob("*.py")):
        if path.name in CLI_MODULES or path.parent.name == "cli":
            continue
        for line, text in _message_strings(ast.parse(path.read_text(), str(path))):
            if FLAG.search(text) and "fastvae train --resume" not in text:
                found.append(f"{path.relative_to(PKG.parent)}:{line}: {text[:80]!r}")
    assert not found, "\n".join(found)
