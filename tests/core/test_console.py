"""What the CLI prints: user strings never read as rich markup, one line per error, one line on
Ctrl-C, no raw decord/FFmpeg log lines."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO

PY = sys.executable
ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"
INTERRUPTED = "interrupted; rerun the same command to resume"


def avatar(*args, env=None):
    return subprocess.run([PY, "-m", "avatarcli", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "400", **(env or {})}, timeout=300)


def test_progress_skip_lines_and_tables_print_brackets_literally(capsys, monkeypatch):
    from avatarcli.cli import common
    from avatarcli.cli.stages import print_summary
    from avatarcli.stage import Summary

    monkeypatch.setattr(common.STATE, "verbose", 1)  # -v: the progress is drawn and each skip printed
    reason = "not a readable video ([/tmp/[bold]/x.mp4] broken metadata)"
    with common.StageProgress("[bold]stage", unit="videos") as progress:
        progress.start(total_units=2)
        progress.unit_done("[/x]bad.mp4", "skipped", reason)
        progress.unit_done("[bold]good.mp4", "ok", "")  # the last one shown on the bar
    summary = Summary(stage="[red]s", output="[/o].h5", unit="video", units=2, units_now=2, reused=0, frames=3,
                      skipped=[("[/x]bad.mp4", reason)], warnings=["[bold]w.mp4 has [/x] frames"],
                      timings={"[b]step": {"seconds": 1.0}})
    print_summary(summary)
    printed = capsys.readouterr().err
    for text in ("[bold]stage", "[bold]good.mp4", f"skipped [/x]bad.mp4: {reason}", "[/x]bad.mp4", reason,
                 "[bold]w.mp4 has [/x] frames", "[b]step 1.00"):
        assert text in printed, (text, printed)


def test_preprocess_and_info_of_bracketed_names(models_dir, tmp_path):
    """A PNG named .mp4 in a folder named '[bold]' (decord's reason holds '[/path]') beside a good
    video: the run ends with exit 0 and the output path, and ``avatar info`` shows the skip as is."""
    from avatarcli.video import write_video

    folder = tmp_path / "[bold]"
    folder.mkdir()
    (folder / "[bold]pic.mp4").write_bytes(_png_bytes())
    write_video(folder / "[red]good.mp4", _face_frames(models_dir), fps=25)
    out = folder / "out[bold].h5"
    result = avatar("-v", "preprocess", folder, "-o", out, "--models", models_dir, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{out}\n"
    assert "skipped [bold]pic.mp4: not a readable video" in result.stderr
    assert "MarkupError" not in result.stderr
    info = avatar("info", out)
    assert info.returncode == 0, info.stderr[-3000:]
    assert str(out) in info.stdout
    assert str(folder / "[bold]pic.mp4") in info.stdout  # the skipped input's path, brackets kept
    assert f"[{folder}" in info.stdout  # decord's reason names it as '[/path...]', markup's closing tag


def _png_bytes() -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.full((32, 32, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


def _face_frames(models_dir) -> np.ndarray:
    """A real face (the assets' example image), 30 frames of it (a track needs 25)."""
    import cv2

    image = cv2.imread(str(models_dir.parent / "data" / "deep3d_examples" / "000002.jpg"))[:, :, ::-1]
    image = np.ascontiguousarray(image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2])
    return np.repeat(image[None], 30, axis=0)


def test_an_error_with_newlines_prints_one_line(tmp_path, capsys, monkeypatch):
    # HDF5 puts a ctime() (with its newline) into a disk-full write error
    message = ("[Errno 28] Can't write data (file write failed: time = Thu Nov 26 17:10:31 2026\n, filename = "
               f"'{tmp_path}/[bold]/a.h5', errno = 28, error message = 'No space left on device')")

    def full_disk():
        raise OSError(message)

    from avatarcli.cli import app

    monkeypatch.setattr(app, "app", full_disk)
    with pytest.raises(SystemExit) as exited:
        app.main()
    assert exited.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "error: OSError: [Errno 28] Can't write data" in lines[0] and "2026 , filename" in lines[0]
    assert f"'{tmp_path}/[bold]/a.h5'" in lines[0] and "No space left on device" in lines[0]
    # an AvatarError naming a path with a newline: still one line, exit 2
    result = avatar("info", tmp_path / "two\nlines[/x].h5")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "lines[/x].h5" in lines[0], result.stderr


def test_unreadable_videos_leave_no_raw_decoder_lines_on_stderr(tmp_path, capfd):
    from avatarcli.video import SkipInput, _native_log_lines_dropped, decode, open_video, write_video

    good = tmp_path / "good.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (20, 64, 64, 3), dtype=np.uint8)
    write_video(good, frames, fps=25)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:600])  # cut inside the index (moov, at the front)
    (tmp_path / "picture.mp4").write_bytes(_png_bytes())
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    corrupt = bytearray(data)  # frames corrupted in the middle: decodes, with decoder complaints
    corrupt[len(data) // 3: len(data) // 3 + 2000] = bytes(2000)
    (tmp_path / "middle.mp4").write_bytes(bytes(corrupt))
    capfd.readouterr()
    for name in ("cut.mp4", "picture.mp4", "noise.mp4"):
        with pytest.raises(SkipInput):
            open_video(str(tmp_path / name))
    reader, info = open_video(str(tmp_path / "middle.mp4"))
    list(decode(reader, info, np.arange(info.num_frames), 8))
    assert capfd.readouterr().err == ""
    # other lines written to fd 2 meanwhile are passed on; decord's own are dropped
    with _native_log_lines_dropped():
        os.write(2, b"[17:10:45] /src/video/video_reader.cc:83: ERROR opening: x.mp4\nkept line\n")
    assert capfd.readouterr().err == "kept line\n"


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_prints_one_line_and_exits_130(assets, tmp_path, debug):
    out = tmp_path / "synth.h5"
    command = [PY, "-m", "avatarcli", *(["--debug"] if debug else []), "synth", "-o", str(out), "--clips", "64",
               "--frames", "200", "--size", "256", "--face-model", str(assets / ICT), "--device", "cpu"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "synth.h5.parts"
    deadline = time.monotonic() + 120
    while not parts.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the stage's work
    assert run.poll() is None, "the run ended before it could be interrupted"
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-3000:]
    assert stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if debug:
        assert "Traceback" in stderr and "KeyboardInterrupt" in stderr and lines[-1] == INTERRUPTED
    else:
        assert lines == [INTERRUPTED], stderr[-3000:]
