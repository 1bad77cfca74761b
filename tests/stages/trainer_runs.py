"""What the trainer-stage tests share: ``avatar`` as a script (torchrun starts a script) and a run
killed with SIGKILL once a given checkpoint exists."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    """``avatar`` as a script (torchrun starts a script)."""
    path = tmp_path_factory.mktemp("bin") / "avatar_cli.py"
    path.write_text("from avatarcli.cli.app import main\nmain()\n")
    return path


def kill_after_checkpoint(argv: list[str], env: dict, out: Path, step: int) -> int:
    """Start ``argv`` (a trainer writing ``out``), SIGKILL it once checkpoint ``step`` is on disk; the
    latest checkpoint step it left. The artifact must not exist yet."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoints = Path(str(out) + ".run") / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / f"step_{step:08d}.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()  # killed mid-run, before the artifact
    return max(int(p.stem.split("_")[1]) for p in checkpoints.glob("step_*.pt"))
