"""The console script: `--version`, help text on every flag of every verb, and the README's command table
listing every verb (a new verb needs a row there)."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longctx import __version__
from longctx.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(verb path, parser, help of that verb) for every leaf verb, e.g. ("data", "synth")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from _walk(child, path + (name,))


def _verb_helps(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield path + (name,), helps.get(name)
                yield from _verb_helps(child, path + (name,))


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    return [m.group(1).replace("\\|", "|") for m in re.finditer(r"^\|\s*`(longctx [^`]*)`", section, re.M)]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"longctx {__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject  # one version, not two that drift


def test_version_from_the_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "longctx.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"longctx {__version__}"


def test_every_flag_and_verb_has_help_text():
    parser = build_parser()
    missing = []
    for path, sub in _walk(parser):
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"longctx {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    missing += [f"longctx {' '.join(p)} (verb)" for p, h in _verb_helps(parser) if not (h or "").strip()]
    missing += [f"longctx {a.option_strings}" for a in parser._actions
                if a.option_strings and not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"flags/verbs without help text: {missing}"


def test_help_check_catches_a_flag_without_help():
    """Negative control: the walk above does see a flag added without help."""
    parser = build_parser()
    leaf = dict(_walk(parser))[("rope", "suggest")]
    leaf.add_argument("--undocumented", type=int)
    assert any(not a.help for a in leaf._actions if "--undocumented" in a.option_strings)


def test_readme_command_table_lists_every_verb():
    commands = _readme_commands()
    assert commands, "README.md has no command table under '## Command line'"
    listed = {c.split(" --")[0].split(" [")[0].strip() for c in commands}
    expanded = set()
    for c in listed:  # `longctx config show|validate|schema` covers its three actions
        words = c.split()
        expanded |= {" ".join(words[:-1] + [w]) for w in words[-1].split("|")}
    parser = build_parser()
    verbs = {"longctx " + " ".join(path) for path, _ in _walk(parser)}
    for path, sub in list(_walk(parser)):  # positional choices (config show|validate|schema, data synth cip|...)
        for a in sub._actions:
            if not a.option_strings and a.choices and not isinstance(a, argparse._SubParsersAction):
                verbs.discard("longctx " + " ".join(path))
                verbs |= {"longctx " + " ".join(path + (c,)) for c in a.choices}
    missing = sorted(v for v in verbs if v not in expanded)
    assert not missing, f"README.md's command table lacks: {missing}"
    unknown = sorted(v for v in expanded if v not in verbs)
    assert not unknown, f"README.md's command table lists verbs the CLI does not have: {unknown}"


@pytest.mark.parametrize("action, own", [("show", "--config"), ("validate", "--kind"), ("schema", "--output")])
def test_config_actions_print_their_own_help(action, own, capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", action, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: longctx config {action}") and own in out
    assert "{show,validate,schema}" not in out  # not the parent's help


def test_rope_suggest_warns_when_the_target_is_not_longer(capsys):
    assert main(["rope", "suggest", "--head-dim", "32", "--train-len", "1024", "--target-len", "256"]) == 0
    err = capsys.readouterr().err
    assert "warning: --target-len 256 is not longer than --train-len 1024" in err
    assert main(["rope", "suggest", "--head-dim", "32", "--train-len", "256", "--target-len", "1024"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_eval_run_without_a_model_says_only_baselines_are_evaluated(capsys):
    from longctx import preflight
    from longctx.config import EMBEDDED_DEFAULT, load_config

    preflight.require(load_config(EMBEDDED_DEFAULT), "eval")
    err = capsys.readouterr().err
    assert ("[preflight] warning: eval.model: not set: only the base model builtin:tiny-llama and its training-free "
            "baselines (naive, dynamic_ntk) are evaluated") in err
    preflight.require(load_config(EMBEDDED_DEFAULT, ["eval.model=builtin:tiny-llama"]), "eval")
    assert "eval.model: not set" not in capsys.readouterr().err
