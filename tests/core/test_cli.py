import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PY = sys.executable


def avatar(*args, stdin=None, env=None):
    return subprocess.run([PY, "-m", "avatarcli", *args], capture_output=True, text=True, input=stdin,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_commands_with_examples_and_imports_no_torch():
    code = (
        "import sys\n"
        "from avatarcli.cli.app import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert out.stdout.strip().endswith("NO_TORCH"), out.stdout[-300:]
    for command in ("preprocess", "info", "merge", "models"):
        assert command in out.stdout
    assert out.stdout.count("e.g. avatar") >= 4


def test_unknown_artifact_gives_one_line_error(tmp_path):
    result = avatar("info", str(tmp_path / "missing.h5"))
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "no such file" in lines[0]
    assert "Traceback" not in result.stderr
    debug = avatar("--debug", "info", str(tmp_path / "missing.h5"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_info_reads_path_from_stdin_and_rejects_unknown_kinds(tmp_path):
    from tests.core.test_artifact import write_toy

    path = write_toy(tmp_path / "toy.h5")  # 'toy' is registered only inside the test process
    result = avatar("info", "-", "--json", stdin=f"{path}\n")
    assert result.returncode == 2 and "unknown artifact kind 'toy'" in result.stderr
    empty = avatar("info", "-", stdin="")
    assert empty.returncode == 2 and "stdin was empty" in empty.stderr


def test_models_lists_and_verifies(models_dir):
    result = avatar("models", "--json", "--models", str(models_dir))
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["scrfd_2.5g"]["status"] == "ok"
    assert rows["pfld68"]["status"] == "ok"
    assert rows["arcface_r50"]["status"] == "missing"
    assert result.returncode == 0
