"""Progress and tables when stderr is not a terminal: plain progress lines (units, rate, ETA) at
most one per interval plus a final one, none with -q; summary tables never cut at 80 columns."""

import io
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from tests.conftest import REPO

ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"
STAGE_LINE = re.compile(r"^synth: (\d+)/3 clips, (\d+) frames, ([\d.]+) frames/s, ETA (\d+:\d\d:\d\d|\?)(, last \S+)?$")


def test_a_piped_run_prints_progress_lines_then_a_table_that_fits(assets, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a pipe: rich's default 80 columns
    env["AVATAR_PROGRESS_INTERVAL"] = "0.2"
    out = tmp_path / "s.h5"
    result = subprocess.run([sys.executable, "-m", "avatarcli", "--device", "cpu", "synth", "-o", str(out),
                             "--clips", "3", "--frames", "8", "--size", "32", "--face-model", str(assets / ICT)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{out}\n"
    lines = [line for line in result.stderr.splitlines() if line.startswith("synth: ")]
    assert len(lines) >= 2, result.stderr
    matches = [STAGE_LINE.match(line) for line in lines]
    assert all(matches), lines
    assert sum(m.group(4) != "?" for m in matches) >= 2, lines  # an ETA once a clip is done
    assert all(float(m.group(3)) > 0 for m in matches), lines
    done = [int(m.group(1)) for m in matches]
    frames = [int(m.group(2)) for m in matches]
    assert done == sorted(done) and frames == sorted(frames), lines
    last = matches[-1]
    assert (last.group(1), last.group(2), last.group(4)) == ("3", "24", "0:00:00"), lines[-1]
    assert "…" not in result.stderr and max(len(line) for line in result.stderr.splitlines()) <= 80, result.stderr
    for header in ("clips", "done", "kept", "coverage", "frames/s"):
        assert header in result.stderr
    # avatar info of that artifact in a pipe: its dataset table folds long paths, it never cuts them
    info = subprocess.run([sys.executable, "-m", "avatarcli", "info", str(out)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert info.returncode == 0 and "…" not in info.stdout + info.stderr, info.stdout


@pytest.fixture
def piped_stderr(monkeypatch):
    """The CLI's stderr console writing to a buffer that is not a terminal, 80 columns wide."""
    from avatarcli.cli import common, stages

    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=False, highlight=False)
    monkeypatch.setattr(common, "err", console)
    monkeypatch.setattr(stages, "err", console)
    monkeypatch.setattr(common.STATE, "quiet", False)
    monkeypatch.setattr(common.STATE, "verbose", 0)
    monkeypatch.delenv("RANK", raising=False)
    return buffer


@pytest.mark.parametrize("quiet", [False, True])
def test_stage_progress_writes_lines_unless_quiet(piped_stderr, monkeypatch, quiet):
    from avatarcli.cli import common

    monkeypatch.setattr(common.STATE, "quiet", quiet)
    monkeypatch.setenv("AVATAR_PROGRESS_INTERVAL", "0")  # every update is due
    with common.StageProgress("preprocess", unit="videos") as progress:
        progress.start(total_units=6, done_units=2)  # 2 kept from an earlier run: not in the pace
        progress.advance_frames(100)
        progress.unit_done("a.mp4", "ok", "")
        progress.unit_done("b [x].mp4", "skipped", "no face")
    lines = piped_stderr.getvalue().splitlines()
    if quiet:
        assert lines == []
        return
    assert lines[0].startswith("preprocess: 2/6 videos, 100 frames, ") and lines[0].endswith("ETA ?"), lines
    assert re.fullmatch(r"preprocess: 3/6 videos, 100 frames, [\d.]+ frames/s, ETA \d+:\d\d:\d\d, last a\.mp4",
                        lines[1]), lines
    assert lines[-1].startswith("preprocess: 4/6 videos,") and lines[-1].endswith(", last skipped b [x].mp4"), lines
    assert len(lines) == 4  # three updates and the final line


def test_stage_progress_prints_no_final_line_when_the_run_fails(piped_stderr, monkeypatch):
    from avatarcli.cli import common

    monkeypatch.setenv("AVATAR_PROGRESS_INTERVAL", "60")  # nothing due during the run
    with pytest.raises(KeyboardInterrupt):
        with common.StageProgress("synth", unit="clips") as progress:
            progress.start(total_units=2)
            progress.unit_done("c0", "ok", "")
            raise KeyboardInterrupt
    assert piped_stderr.getvalue() == ""
    with common.StageProgress("synth", unit="clips") as progress:
        progress.start(total_units=1)
        progress.unit_done("c0", "ok", "")
    assert piped_stderr.getvalue().startswith("synth: 1/1 clips, 0 frames, ")


def test_trainer_lines_format_pace_and_throttle():
    from avatarcli.cli.progress import TrainProgressLines, train_line

    assert train_line("train-recon", 400, 2000, 400 / 65.6, 0.0123, 1600 * 65.6 / 400) == \
        "train-recon: step 400/2000, 6.1 steps/s, loss 0.0123, ETA 0:04:22"
    assert train_line("t", 5, 10, 0.25, 2.5, None, skipped=3) == "t: step 5/10, 0.25 steps/s, loss 2.5, ETA ?, 3 skipped"
    buffer = io.StringIO()
    now = [100.0]
    bar = TrainProgressLines("pretrain-expr", Console(file=buffer, width=80), interval=5.0, clock=lambda: now[0])
    bar.start(total=24, done=4)  # resumed at step 4: the pace counts this run's steps only
    for step in range(5, 25):  # one step a second
        now[0] += 1.0
        bar.update(step, 1.0 / step, {"skipped": 0})
    bar.close()
    bar.close()  # the engine's finally and the CLI's exit both close: one final line
    lines = buffer.getvalue().splitlines()
    assert lines == ["pretrain-expr: step 9/24, 1.0 steps/s, loss 0.1111, ETA 0:00:15",
                     "pretrain-expr: step 14/24, 1.0 steps/s, loss 0.07143, ETA 0:00:10",
                     "pretrain-expr: step 19/24, 1.0 steps/s, loss 0.05263, ETA 0:00:05",
                     "pretrain-expr: step 24/24, 1.0 steps/s, loss 0.04167, ETA 0:00:00",
                     "pretrain-expr: step 24/24, 1.0 steps/s, loss 0.04167, ETA 0:00:00"], lines
    stopped = io.StringIO()  # interrupted before the last step: its error line says where; no final line
    bar = TrainProgressLines("t", Console(file=stopped, width=80), interval=5.0, clock=lambda: now[0])
    bar.start(total=100, done=0)
    bar.update(1, 0.5, {})
    bar.close()
    assert stopped.getvalue() == ""


def test_train_progress_display_is_lines_in_a_pipe_and_nothing_when_quiet(piped_stderr, monkeypatch):
    from avatarcli.cli import common
    from avatarcli.cli.progress import TrainProgressLines
    from avatarcli.stage import StageSpec

    spec = StageSpec(name="train-recon", summary="", help="", config=object, run=lambda *a, **k: None, inputs=())
    assert isinstance(common.TrainProgressDisplay(spec).bar, TrainProgressLines)
    monkeypatch.setattr(common.STATE, "quiet", True)
    assert common.TrainProgressDisplay(spec).bar is None
    monkeypatch.setattr(common.STATE, "quiet", False)
    monkeypatch.setenv("RANK", "1")  # other DDP ranks: rank 0 reports
    assert common.TrainProgressDisplay(spec).bar is None


def test_a_bad_interval_is_one_clear_error(monkeypatch):
    from avatarcli.cli.progress import progress_interval
    from avatarcli.errors import AvatarError

    monkeypatch.setenv("AVATAR_PROGRESS_INTERVAL", "soon")
    with pytest.raises(AvatarError, match="AVATAR_PROGRESS_INTERVAL must be a number of seconds"):
        progress_interval()
    monkeypatch.setenv("AVATAR_PROGRESS_INTERVAL", "0.5")
    assert progress_interval() == 0.5


BOX = re.compile(r"[\u2500-\u257f\s]")  # box drawing and spaces


@pytest.mark.parametrize("columns", [
    {"clips": 12, "identities": 6},  # fits across, headers wrapped at spaces
    {"identities": 12, "steps": 60000, "run now": 60000, "skipped steps": 0, "steps/s": "6.12", "loss": "0.1234",
     "match acc": "0.512", "landmark error px": "0.69"},  # too wide: one row per figure
    {"mode": "same-id", "checkpoint": "/very/long/" + "x" * 120 + ".h5"},  # a value wider than the console
])
def test_summary_tables_are_not_cut_at_80_columns(piped_stderr, columns):
    from avatarcli.cli.stages import print_summary
    from avatarcli.stage import Summary

    summary = Summary(stage="pretrain-expr", output="o.h5", unit="clip", units=6, units_now=4, reused=2,
                      frames=1193, frames_now=1193, seconds=20.0, columns=columns)
    print_summary(summary)
    printed = piped_stderr.getvalue()
    assert "…" not in printed and max(len(line) for line in printed.splitlines()) <= 80, printed
    flat = BOX.sub("", printed)  # folded text joins up again without the borders and line breaks
    shown = {"clips": 6, "done now": 4, "kept from before": 2, "frames": 1193, "skipped": 0, **columns,
             "frames/s": "59.6"}
    for name, value in shown.items():
        for word in name.split():
            assert word in printed, (word, printed)
        assert BOX.sub("", str(value)) in flat, (value, printed)
