"""The README's two commands are the ones CI runs: install line and test command must agree with .ci/run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return [b.split("```", 1)[0].strip() for b in text.split("```bash")[1:]]


def test_readme_starts_with_the_two_commands():
    blocks = _readme_blocks()
    assert blocks[0].endswith("python jobs/long_pt.py"), blocks[0]
    assert blocks[1].endswith("python -m pytest"), blocks[1]


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -c constraints-ci.txt -e ".[test]"'
    assert install in _readme_blocks()[0] and install in _readme_blocks()[1]
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert install in ci_lines
    assert "python -m pytest" in ci_lines
