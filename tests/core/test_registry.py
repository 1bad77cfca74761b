import shutil

import pytest

from avatarcli import registry
from avatarcli.errors import AvatarError, ModelNotFoundError


def test_search_order_models_dir_then_env(tmp_path, monkeypatch, models_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    (second / "landmarks68").mkdir(parents=True)
    shutil.copy(models_dir / "landmarks68" / "pfld_68.onnx", second / "landmarks68" / "pfld_68.onnx")
    first.mkdir()
    shutil.copy(models_dir / "landmarks68" / "pfld_68.onnx", first / "pfld_68.onnx")  # flat layout
    monkeypatch.setenv("AVATAR_MODELS", str(second))
    assert registry.resolve("pfld68", first) == first / "pfld_68.onnx"
    assert registry.resolve("pfld68") == second / "landmarks68" / "pfld_68.onnx"


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    (tmp_path / "pfld_68.onnx").write_bytes(b"not the model")
    with pytest.raises(AvatarError, match="sha256"):
        registry.resolve("pfld68", tmp_path)


def test_offline_error_names_file_and_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve("arcface_r50", tmp_path)
    message = str(info.value)
    assert "w600k_r50.onnx" in message and str(tmp_path) in message and "AVATAR_MODELS" in message


def test_every_entry_is_complete():
    for spec in registry.MODELS.values():
        assert spec.url.startswith("https://") and spec.license and spec.input and spec.source
        assert spec.sha256 is None or len(spec.sha256) == 64


def test_unknown_name():
    with pytest.raises(AvatarError, match="unknown model"):
        registry.resolve("nope")
