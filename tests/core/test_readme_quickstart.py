"""The README's quickstart, run verbatim: the ```bash block after ``<!-- quickstart -->`` in
README.md goes to bash (``-e -o pipefail``) in a temporary layout like a fresh clone (the tracked
files of this repository in ``avatar/``, the shared assets in ``shared/assets`` beside it), with no
``AVATAR_MODELS`` set; then every artifact it wrote is checked. The ``avatar`` it runs is this
environment's (installed from this checkout)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.conftest import REPO

BLOCK = re.compile(r"^<!-- quickstart -->\n```bash\n(.*?)^```$", re.S | re.M)
PLACEHOLDER = re.compile(r"<[^<>\s|]+>")
"""``<videos/>``, ``<ref.h5>``: what a user substitutes (a shell redirection has spaces or nothing to close it)."""


def quickstart_block(readme: str) -> str:
    """The shell text of the README's quickstart block (the one after its marker comment)."""
    blocks = BLOCK.findall(readme)
    assert len(blocks) == 1, "README.md needs exactly one ```bash block right after <!-- quickstart -->"
    return blocks[0]


def test_the_quickstart_block_has_no_placeholders_and_an_absolute_models_path():
    block = quickstart_block((REPO / "README.md").read_text())
    assert not PLACEHOLDER.findall(block), PLACEHOLDER.findall(block)
    assert re.search(r"^export AVATAR_MODELS=\$PWD/", block, re.M), block
    for command in ("preprocess", "fit-3dmm", "eval", "pretrain-expr"):
        assert re.search(rf"\bavatar {command}\b", block), command
    assert PLACEHOLDER.findall("avatar preprocess <videos/> -o x.h5 --fps 10 > log.txt") == ["<videos/>"]


def fresh_clone(root: Path, assets: Path) -> Path:
    """``root/avatar`` with this repository's tracked files (as they are in the working tree) and
    ``root/shared/assets`` linking to the assets."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    clone = root / "avatar"
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    (root / "shared").mkdir()
    (root / "shared" / "assets").symlink_to(assets.resolve(), target_is_directory=True)
    return clone


def info(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "avatarcli", "info", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_the_readme_quickstart_runs_verbatim_from_a_fresh_clone(assets, tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (its tracked files make the clone)")
    block = quickstart_block((REPO / "README.md").read_text())
    clone = fresh_clone(tmp_path, assets)
    env = {k: v for k, v in os.environ.items() if k not in ("AVATAR_MODELS", "COLUMNS")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # the venv's `avatar`
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    out = clone / "quickstart"
    names = ("clips.h5", "coeffs.h5", "coeffs_lmk.h5", "eval.h5", "encoder.h5")
    clips, coeffs, coeffs_lmk, evaluation, encoder = (info(out / name) for name in names)
    assert [a["kind"] for a in (clips, coeffs, coeffs_lmk, evaluation, encoder)] == [
        "clips", "coeffs", "coeffs", "eval", "encoder"]
    assert clips["counts"]["clips"] == 2 and clips["counts"]["identities"] == 2 and clips["counts"]["skipped"] == 0
    with h5py.File(out / "clips.h5") as h:
        clip_ids = sorted(h["clips"])
        frames = {name: len(h["clips"][name]["frames"]) for name in clip_ids}
    assert all(n >= 25 for n in frames.values()), frames
    assert [c.split("-")[0] for c in clip_ids] == ["feifeili_clip3", "s13"], clip_ids
    for name in ("coeffs.h5", "coeffs_lmk.h5"):  # every frame of both clips fitted
        with h5py.File(out / name) as h:
            assert {clip: len(h["coeffs"][clip]["expression"]) for clip in h["coeffs"]} == frames, name
    assert coeffs["provenance"]["config"]["landmarks_only"] is False
    assert coeffs_lmk["provenance"]["config"]["landmarks_only"] is True

    for name in clip_ids:  # previews: a PNG grid and an mp4 per clip
        png, mp4 = out / "previews" / f"{name}.png", out / "previews" / f"{name}.mp4"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
        assert mp4.stat().st_size > 1_000 and mp4.read_bytes()[4:8] == b"ftyp", mp4

    with open(out / "eval.csv", newline="") as handle:
        rows = {row["generated"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(clip_ids) | {"ALL"}, rows
    for metric in ("aed", "apd"):
        values = [float(row[metric]) for row in rows.values()]
        # finite and > 0: the photometric stage moves every clip's fit, a little (AED ~0.02, APD ~0.003 measured)
        assert all(math.isfinite(v) and 0 < v < 0.5 for v in values), (metric, values)
    assert int(rows["ALL"]["frames"]) == sum(frames.values())
    with h5py.File(out / "eval.h5") as h:  # the defaults for two coeffs artifacts
        assert [m.decode() if isinstance(m, bytes) else m for m in h["metrics/name"][()]] == ["aed", "apd"]

    assert encoder["provenance"]["config"]["engine"]["steps"] == 20
    with h5py.File(out / "encoder.h5") as h:
        assert int(h.attrs["steps"]) == 20 and len(h["training/loss"]) >= 1
        assert all(math.isfinite(v) for v in h["training/loss"][()])
    assert (out / "encoder.embedding.png").read_bytes()[:4] == b"\x89PNG"
    import torch

    if not torch.cuda.is_available():  # CPU-sized by itself: said on stderr, recorded in the artifact's config
        config = encoder["provenance"]["config"]
        assert (config["width"], config["image_size"], config["negatives"], config["batch_clips"]) == (16, 64, 15, 16)
        assert "pretrain-expr: on the CPU, so CPU-sized --width 16" in done.stderr
    assert not list(out.glob("*.parts")) and not list(out.rglob("*.tmp*")), sorted(out.rglob("*"))
