"""Every `jaxllm` command and sub-action answers `--help` with a usage line, and README's command table
lists exactly the commands that exist (README: "Every command has `--help`, and the test suite runs each
of them")."""
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from jaxllm.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
SUBACTIONS = {
    "convert": ["apply-delta"],
    "data": ["gatt", "curriculum"],
    "eval": ["perplexity", "choice", "harness"],
    "tokenizer": ["train", "extend", "encode", "decode", "stats"],
}
INVOCATIONS = [[name] for name in COMMANDS] + [[name, action] for name, actions in SUBACTIONS.items()
                                                for action in actions]


def readme_commands() -> dict[str, list[str]]:
    """{command: [sub-actions]} from the `jaxllm …` rows of README's command table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    found: dict[str, list[str]] = {}
    for usage in re.findall(r"^\| `jaxllm ([^`]+)`", section, flags=re.M):
        alternatives = [part.split() for part in usage.split(r" \| ")]
        first = alternatives[0]
        if len(first) == 1:  # `sft \| dpo \| rm [RECIPE]`: alternative commands
            for words in alternatives:
                found.setdefault(words[0], [])
            continue
        actions = found.setdefault(first[0], [])
        if re.fullmatch(r"[a-z][a-z-]*", first[1]):  # `eval perplexity \| choice …`: sub-actions
            actions += [first[1]] + [words[0] for words in alternatives[1:]]
    return found


def test_readme_command_table_matches_the_cli():
    documented = readme_commands()
    assert set(documented) == set(COMMANDS), "README's command table and jaxllm.cli.COMMANDS differ"
    assert {k: v for k, v in documented.items() if v} == SUBACTIONS


@pytest.mark.parametrize("argv", INVOCATIONS, ids=" ".join)
def test_help(argv, capsys):
    try:
        code = main([*argv, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr().out
    assert code in (0, None), out
    assert out.startswith(f"usage: jaxllm {' '.join(argv)} "), out[:200]


def test_console_script_entry_point():
    """The installed `jaxllm` script is `jaxllm.cli:main` and runs (one subprocess: the fast path)."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "jaxllm"]
    assert script.value == "jaxllm.cli:main"
    executable = Path(sys.executable).parent / "jaxllm"
    command = [str(executable)] if executable.exists() else [sys.executable, "-c",
                                                             "import sys, jaxllm.cli; sys.exit(jaxllm.cli.main())"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: jaxllm COMMAND")
    for name in COMMANDS:
        assert f"  {name} " in done.stdout


def test_unknown_command_fails_with_usage(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "usage: jaxllm" in err
