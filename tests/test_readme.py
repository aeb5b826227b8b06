"""The README is a user's manual that runs: its Python blocks run on the built-in model, every `python -m`
command it shows answers `--help`, and it stays short."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SUBCOMMANDS = {"lmms_adaptive.tools.estimator": 1, "lmms_adaptive.tools.lookup": 1, "lmms_adaptive.tools.report": 1}


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def module_commands() -> list[list[str]]:
    """Each `python -m MODULE [SUBCOMMAND]` the README's shell blocks show (continuation lines joined)."""
    commands = []
    for body in blocks(""):
        for line in body.replace("\\\n", " ").splitlines():
            if line.startswith("python -m "):
                module, *rest = shlex.split(line, comments=True)[2:]
                commands.append([module, *rest[: SUBCOMMANDS.get(module, 0)]])
    return commands


def test_readme_is_a_short_manual() -> None:
    assert len(README.read_bytes()) <= 12 * 1024


def test_python_blocks_run_on_the_built_in_model(capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = blocks("python")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert "KnobSpace(" in capsys.readouterr().out


@pytest.mark.parametrize("command", module_commands(), ids=" ".join)
def test_every_command_answers_help(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
