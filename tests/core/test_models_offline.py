"""Model lookup as a new user meets it: $AVATAR_MODELS relative, a list, the shared models/3dmm
layout (a symlink or git's symlink stub), and offline runs with missing models (one error naming
all of them, nothing left behind)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from avatarcli import registry
from avatarcli.errors import ModelNotFoundError
from avatarcli.facemodel import resolve_face_model
from tests.conftest import REPO

ICT = registry.MODELS["ict_facekit"]


def _landmarks_folder(models_dir: Path, root: Path) -> Path:
    """``root`` holding pfld_68.onnx (a link to the shared copy) in the registry layout."""
    (root / "landmarks68").mkdir(parents=True)
    (root / "landmarks68" / "pfld_68.onnx").symlink_to(models_dir / "landmarks68" / "pfld_68.onnx")
    return root


def test_relative_env_is_made_absolute_for_the_start_directory(tmp_path, monkeypatch, models_dir):
    _landmarks_folder(models_dir, tmp_path / "models")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("AVATAR_MODELS", "../models")
    registry.absolutize_models_env()
    assert os.environ["AVATAR_MODELS"] == str(tmp_path / "models")
    monkeypatch.chdir(tmp_path)  # later lookups (and workers) no longer depend on the directory
    assert registry.resolve("pfld68") == tmp_path / "models" / "landmarks68" / "pfld_68.onnx"


def test_cli_resolves_relative_env_from_another_directory(tmp_path, models_dir):
    _landmarks_folder(models_dir, tmp_path / "models")
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "AVATAR_MODELS": "../models", "COLUMNS": "300", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "avatarcli", "models"], cwd=tmp_path / "elsewhere", env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "pfld68" in line)
    assert " ok " in row and str(tmp_path / "models" / "landmarks68") in row


def test_list_of_folders_found_in_the_second_and_missing_one_reported_once(tmp_path, monkeypatch, capsys,
                                                                          models_dir):
    empty, missing = tmp_path / "empty", tmp_path / "typo"
    empty.mkdir()
    second = _landmarks_folder(models_dir, tmp_path / "second")
    monkeypatch.setenv("AVATAR_MODELS", os.pathsep.join([str(empty), str(missing), str(second)]))
    assert registry.resolve("pfld68") == second / "landmarks68" / "pfld_68.onnx"
    assert registry.resolve("pfld68") == second / "landmarks68" / "pfld_68.onnx"
    warnings = [line for line in capsys.readouterr().err.splitlines() if str(missing) in line]
    assert len(warnings) == 1 and "does not exist" in warnings[0]
    assert registry.search_dirs()[:3] == [empty, missing, second]


@pytest.mark.parametrize("link", ["symlink", "git_stub"])
def test_ict_by_name_through_the_shared_models_layout(tmp_path, monkeypatch, assets, link):
    # the shared assets: models/3dmm -> ../3dmm, the face models at 3dmm/ict_facekit/<file>
    shared = tmp_path / "assets"
    (shared / "3dmm" / "ict_facekit").mkdir(parents=True)
    (shared / "3dmm" / "ict_facekit" / ICT.filename).symlink_to(assets / "3dmm" / "ict_facekit" / ICT.filename)
    (shared / "models").mkdir()
    if link == "symlink":
        (shared / "models" / "3dmm").symlink_to("../3dmm")
    else:  # a checkout or copy that does not keep links: a text file holding the target
        (shared / "models" / "3dmm").write_text("../3dmm")
    monkeypatch.setenv("AVATAR_MODELS", str(shared / "models"))
    kind, path = resolve_face_model("ict", allow_download=False)
    assert kind == "ict" and path.resolve() == (shared / "3dmm" / "ict_facekit" / ICT.filename).resolve()
    # a folder given one level deeper (the face models folder itself) works too
    monkeypatch.setenv("AVATAR_MODELS", str(shared / "3dmm"))
    assert resolve_face_model("ict_facekit", allow_download=False)[1].resolve() == path.resolve()


def _offline_downloads(monkeypatch, tmp_path) -> list[str]:
    """Downloads allowed but the network unreachable: every urlopen fails (and is recorded); a cache
    of this test's own (``tmp_path/cache``, not there yet)."""
    tried: list[str] = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def unreachable(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.delenv("AVATAR_OFFLINE", raising=False)
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    monkeypatch.setattr(registry.urllib.request, "urlopen", unreachable)
    return tried


def test_offline_preprocess_names_every_missing_model_and_leaves_nothing(tmp_path, monkeypatch, assets):
    from stages.preprocess import PreprocessConfig, run

    tried = _offline_downloads(monkeypatch, tmp_path / "home")
    cache = registry.cache_dir()
    models, out = tmp_path / "models", tmp_path / "out" / "clips.h5"
    models.mkdir()
    out.parent.mkdir()
    video = assets / "data" / "liveportrait" / "driving" / "d19.mp4"
    config = PreprocessConfig(device="cpu", models_dir=str(models), detector="scrfd_2.5g", landmarker="pfld68")
    with pytest.raises(ModelNotFoundError) as info:
        run(config, [str(video)], out)
    message = str(info.value)
    assert "\n" not in message and message.startswith("2 models not found")
    for name in ("scrfd_2.5g", "pfld68"):
        spec = registry.MODELS[name]
        assert f"'{name}'" in message and spec.filename in message and spec.url in message
    assert str(models) in message and str(cache) in message and "URLError" in message
    assert len(tried) == 2  # each download was tried, once
    assert list(out.parent.iterdir()) == []  # no clips.h5.parts/
    assert not (tmp_path / "home").exists()  # no empty cache folders


def test_offline_synth_leaves_no_parts(tmp_path, monkeypatch):
    from stages.synth import SynthConfig, run

    _offline_downloads(monkeypatch, tmp_path / "home")
    out = tmp_path / "out" / "synth.h5"
    out.parent.mkdir()
    with pytest.raises(ModelNotFoundError, match="ict_facekit"):
        run(SynthConfig(device="cpu", models_dir=str(out.parent), clips=1, frames=2), out)
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "home").exists()


def test_parts_folder_of_a_run_failing_before_any_unit_is_removed(tmp_path):
    from avatarcli.stage.parts import PartsStore, parts_folder

    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError):
        with PartsStore(out, {"stage": "t"}):
            raise RuntimeError("failed before any unit")
    assert not parts_folder(out).exists()
    with pytest.raises(RuntimeError):  # a finished unit is kept for the resume
        with PartsStore(out, {"stage": "t"}) as store:
            with store.writing("a") as tmp:
                tmp.write_text("unit")
            raise RuntimeError("failed after one unit")
    assert store.done("a")


# distribution name -> the module the code imports (where they differ)
IMPORT_NAMES = {"opencv-python-headless": "cv2", "pillow": "PIL", "tensorboard": "torch.utils.tensorboard"}


def test_every_runtime_dependency_is_imported_by_the_code():
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0] for dep in project["dependencies"]]
    sources = "\n".join(p.read_text() for folder in ("avatarcli", "stages") for p in (REPO / folder).rglob("*.py"))
    unused = [name for name in names if not re.search(
        rf"^\s*(import|from) {re.escape(IMPORT_NAMES.get(name, name))}\b", sources, re.MULTILINE)]
    assert unused == [], f"declared but never imported at run time: {unused}"
    assert "insightface" not in names and any(d.startswith("insightface") for d in project["optional-dependencies"]["test"])
