import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarcli import registry
from avatarcli.errors import AvatarError, ModelNotFoundError
from avatarcli.facemodel import LinearFaceModel, build_ict_compact, load_bfm, load_face_model, load_ict

ICT_REL = Path("3dmm/ict_facekit/ict_face_light_f16.npz")
BFM_INFO_REL = Path("3dmm/bfm_deep3d_aux/facemodel_info.mat")


@pytest.fixture(scope="module")
def ict_path(assets) -> Path:
    path = assets / ICT_REL
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def ict(ict_path) -> LinearFaceModel:
    return load_ict(ict_path)


# ---------------------------------------------------------------------------------------------
# ICT
# ---------------------------------------------------------------------------------------------


def test_ict_shapes_and_metadata(ict, ict_path):
    assert ict.name == "ict_facekit"
    assert ict.mean.shape == (11248, 3) and ict.mean.dtype == torch.float32
    assert ict.faces.shape == (22288, 3) and ict.faces.dtype == torch.int64
    assert ict.id_basis.shape == (100, 11248, 3) and ict.exp_basis.shape == (53, 11248, 3)
    assert ict.lmk68.shape == (68,) and ict.lmk68.dtype == torch.int64
    assert len(ict.exp_names) == 53 and ict.exp_names[26] == "jawOpen"
    assert ict.exp_range == "unit" and ict.exp_std is None and ict.id_std.shape == (100,)
    assert ict.face_region.tolist() == list(range(6706))
    assert ict.units_to_mm == 10.0 and ict.source_units == "cm"
    assert ict.sha256 == registry.get_spec("ict_facekit").sha256
    assert int(ict.faces.min()) >= 0 and int(ict.faces.max()) < 11248
    assert ict.albedo_basis is None and ict.albedo().shape == (1, 11248, 3)
    assert ict.extra["rigid_vertex_idx"].shape == (910,) and ict.extra["fitting_vertex_idx"].shape == (7801,)


def test_ict_neutral_is_in_millimetres(ict, ict_path):
    verts = ict.vertices()
    assert verts.shape == (1, 11248, 3)
    with np.load(ict_path) as data:
        v_cm = data["v_neutral"]
    assert np.allclose(verts[0].numpy(), v_cm * 10.0)
    zeros = ict.vertices(torch.zeros(2, 100), torch.zeros(2, 53))
    assert zeros.shape == (2, 11248, 3) and torch.equal(zeros[1], verts[0])
    face = verts[0, ict.face_region]
    width = float(face[:, 0].max() - face[:, 0].min())
    assert 120.0 < width < 200.0  # a face is ~15 cm wide


def test_ict_vertices_match_the_linear_formula(ict):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 100, generator=g) * 0.5, torch.rand(3, 53, generator=g)
    fast = ict.vertices(a, b)
    slow = ict.mean + torch.einsum("bk,kvc->bvc", a, ict.id_basis) + torch.einsum("bk,kvc->bvc", b, ict.exp_basis)
    assert torch.allclose(fast, slow, atol=1e-3)
    # a truncated identity uses the leading modes
    assert torch.allclose(ict.vertices(a[:, :10]), ict.mean + torch.einsum("bk,kvc->bvc", a[:, :10], ict.id_basis[:10]), atol=1e-3)
    with pytest.raises(ValueError, match="101 coefficients"):
        ict.vertices(torch.zeros(1, 101))
    with pytest.raises(ValueError, match="disagree"):
        ict.vertices(torch.zeros(1, 100), torch.zeros(2, 53))


def test_ict_jaw_open_moves_the_chin_down(ict):
    exp = torch.zeros(1, 53)
    exp[0, ict.exp_index("jawOpen")] = 1.0
    neutral, opened = ict.landmarks(ict.vertices()), ict.landmarks(ict.vertices(exp_coeffs=exp))
    assert opened.shape == (1, 68, 3)
    chin_dy = float(opened[0, 8, 1] - neutral[0, 8, 1])
    assert chin_dy < -10.0  # mm
    # the upper lip barely moves compared to the lower lip
    assert abs(float(opened[0, 51, 1] - neutral[0, 51, 1])) < abs(float(opened[0, 57, 1] - neutral[0, 57, 1]))


def test_ict_landmarks_are_sane(ict):
    assert int(ict.lmk68.min()) >= 0 and int(ict.lmk68.max()) < ict.num_vertices
    lm = ict.landmarks(ict.vertices())[0]
    assert int(lm[:, 2].argmax()) == 30  # nose tip is the most forward landmark
    assert lm[0, 0] < 0 < lm[16, 0]  # jaw contour runs from -x (image left) to +x
    assert lm[19, 1] > lm[30, 1] > lm[8, 1]  # brow above nose tip above chin (+y up)
    assert torch.allclose(lm[:17, 0], -lm[:17, 0].flip(0), atol=1.0)  # symmetric jaw


def test_ict_to_dtype_and_prior(ict):
    m64 = ict.to(dtype=torch.float64)
    assert m64.mean.dtype == torch.float64 and m64.id_basis.dtype == torch.float64
    assert m64.faces.dtype == torch.int64 and m64.extra["rigid_vertex_idx"].dtype == torch.int64
    assert m64.vertices(torch.zeros(1, 100, dtype=torch.float64)).dtype == torch.float64
    assert ict.mean.dtype == torch.float32  # the original is unchanged
    energy = ict.prior_energy(torch.ones(2, 100), torch.ones(2, 53))
    assert torch.allclose(energy, torch.full((2,), 100.0))


def test_load_face_model_ict_by_name(assets, ict, monkeypatch):
    model = load_face_model("ict", assets)  # found at <dir>/3dmm/ict_facekit/
    assert model.sha256 == ict.sha256
    monkeypatch.setenv("AVATAR_MODELS", str(assets))
    assert load_face_model("ict_facekit").num_vertices == 11248
    assert load_face_model(assets / ICT_REL).name == "ict_facekit"


def test_registry_accepts_a_rebuilt_file_by_content(ict_path, tmp_path):
    spec = registry.get_spec("ict_facekit")
    with np.load(ict_path) as data:
        arrays = {k: data[k] for k in data.files}
    (tmp_path / "3dmm/ict_facekit").mkdir(parents=True)
    rebuilt = tmp_path / "3dmm/ict_facekit" / spec.filename
    with open(rebuilt, "wb") as handle:
        np.savez(handle, **arrays)  # same arrays, different bytes
    assert registry.file_sha256(rebuilt) != spec.sha256
    assert registry.resolve("ict_facekit", tmp_path) == rebuilt
    arrays["v_neutral"] = arrays["v_neutral"] + np.float32(0.5)
    with open(rebuilt, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(AvatarError, match="v_neutral"):
        registry.resolve("ict_facekit", tmp_path)


def test_ict_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        load_face_model("ict", tmp_path)
    message = str(info.value)
    assert "ict_face_light_f16.npz" in message and str(tmp_path) in message and "ICT-FaceKit" in message


def test_face_model_name_and_path_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        load_face_model("bfm", tmp_path)
    message = str(info.value)
    assert "BFM_model_front.mat" in message and "Deep3DFaceRecon" in message and "3dmm/bfm" in message
    assert str(tmp_path) in message
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_face_model(tmp_path / "nope.npz")
    with pytest.raises(AvatarError, match="unknown face model"):
        load_face_model("flame")
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(AvatarError, match="expected an .npz"):
        load_face_model(other)
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(AvatarError, match="missing"):
        load_face_model(bad)


# ---------------------------------------------------------------------------------------------
# ICT builder on a fake repository
# ---------------------------------------------------------------------------------------------

N_TOTAL, N_KEEP = 10, 8


def _obj(verts: np.ndarray, faces: list[list[int]] | None = None) -> str:
    lines = ["# fake ICT OBJ", "mtllib ICTFaceModelMaterial.mtl"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt 0.5 0.5" for _ in verts]
    if faces:
        lines += ["f " + " ".join(f"{i + 1}/{i + 1}" for i in face) for face in faces]
    return "\n".join(lines) + "\n"


FAKE_FACES = [[0, 1, 2, 3], [2, 3, 4], [4, 5, 6, 7], [6, 7, 8, 9], [1, 5, 9], [0, 2, 4, 6]]
FAKE_EXPRESSIONS = ["eyeBlink_L", "jawOpen"]


def _fake_repo(root: Path) -> dict:
    rng = np.random.default_rng(0)
    folder = root / "FaceXModel"
    folder.mkdir(parents=True)
    neutral = rng.normal(size=(N_TOTAL, 3)) * 5.0
    (folder / "generic_neutral_mesh.obj").write_text(_obj(neutral, FAKE_FACES))
    shapes = {}
    for name in ["identity000", "identity001", "identity002", *FAKE_EXPRESSIONS, "cheekRaiser_L"]:
        shapes[name] = neutral + rng.normal(size=(N_TOTAL, 3)) * 0.3
        (folder / f"{name}.obj").write_text(_obj(shapes[name], FAKE_FACES))
    config = {
        "expressions": FAKE_EXPRESSIONS,
        "fitting_expressions": FAKE_EXPRESSIONS,
        "incompatibilities": [],
        "idx_to_fitting_verts": [5, 0, 9, 1, 8, 2],
        "idx_to_rigid_verts": [7, 3, 12, 4],
        "idx_to_lap_rigid_verts": [1, 2],
        "idx_to_landmark_verts": [int(i) for i in rng.integers(0, N_KEEP, 68)],
        "idx_to_rigid_landmark_idx": [0, 36, 39, 42, 45, 16, 28, 31, 35],
    }
    (folder / "vertex_indices.json").write_text(json.dumps(config))
    return {"neutral": neutral, "shapes": shapes, "config": config}


def _check_build(out: Path, fake: dict) -> None:
    with np.load(out) as data:
        assert data["v_neutral"].shape == (N_KEEP, 3) and data["v_neutral"].dtype == np.float32
        assert np.allclose(data["v_neutral"], fake["neutral"][:N_KEEP], atol=1e-5)
        # quads split (a,b,c),(a,c,d); faces touching vertices 8, 9 dropped
        assert data["faces"].tolist() == [[0, 1, 2], [0, 2, 3], [2, 3, 4], [4, 5, 6], [4, 6, 7], [0, 2, 4], [0, 4, 6]]
        assert data["faces"].dtype == np.int32
        assert data["exp_names"].tolist() == FAKE_EXPRESSIONS  # cheekRaiser_L is not in the list
        assert data["exp_deltas"].dtype == np.float16 and data["exp_deltas"].shape == (2, N_KEEP, 3)
        assert data["id_deltas"].shape == (3, N_KEEP, 3)
        expected = fake["shapes"]["jawOpen"][:N_KEEP] - fake["neutral"][:N_KEEP]
        assert np.allclose(data["exp_deltas"][1].astype(np.float32), expected, atol=2e-3)
        assert data["lmk68_vertex_idx"].tolist() == fake["config"]["idx_to_landmark_verts"]
        assert data["fitting_vertex_idx"].tolist() == [5, 0, 1, 2]  # order kept, ids >= 8 dropped
        assert data["rigid_vertex_idx"].tolist() == [7, 3, 4]
        assert str(data["units"]) == "cm" and int(data["narrow_face_num_vertices"]) == 6706


def test_build_ict_compact_from_a_checkout(tmp_path):
    fake = _fake_repo(tmp_path / "repo")
    out = build_ict_compact(tmp_path / "repo", tmp_path / "out" / "ict_small", num_vertices=N_KEEP)
    assert out == tmp_path / "out" / "ict_small"  # written exactly there (no ".npz" appended)
    _check_build(out, fake)
    model = load_ict(out)
    assert model.num_vertices == N_KEEP and model.exp_names == FAKE_EXPRESSIONS and model.num_id == 3
    coeffs = torch.tensor([[1.0, -0.5, 0.25]])
    shapes = fake["shapes"]
    expected = fake["neutral"][:N_KEEP] + sum(
        c * (shapes[f"identity{i:03d}"][:N_KEEP] - fake["neutral"][:N_KEEP]) for i, c in enumerate(coeffs[0].tolist())
    )
    assert np.allclose(model.vertices(coeffs)[0].numpy(), expected * 10.0, atol=0.05)
    assert model.face_region.tolist() == list(range(N_KEEP))


def test_build_ict_compact_from_the_archive_zip_and_via_registry_download(tmp_path):
    fake = _fake_repo(tmp_path / "ICT-FaceKit-da5f95a")
    archive = tmp_path / "ict.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "ICT-FaceKit-da5f95a").rglob("*")):
            zf.write(path, path.relative_to(tmp_path).as_posix())
    _check_build(build_ict_compact(archive, tmp_path / "from_zip.npz", num_vertices=N_KEEP), fake)

    # The registry's download step: fetch the archive, run the builder, place the result.
    import dataclasses
    import functools

    spec = dataclasses.replace(registry.get_spec("ict_facekit"), url=archive.as_uri(), sha256=None, content=None)
    assert spec.build == "avatarcli.facemodel.ict:build_ict_compact"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("avatarcli.facemodel.ict.build_ict_compact",
                   functools.partial(build_ict_compact, num_vertices=N_KEEP))
        target = registry.download(spec, dest_dir=tmp_path / "cache")
    assert target == tmp_path / "cache" / "3dmm/ict_facekit/ict_face_light_f16.npz"
    _check_build(target, fake)


def test_builder_layout_matches_the_shared_file(ict_path, tmp_path):
    fake_out = build_ict_compact(_fake_repo_path(tmp_path), tmp_path / "small.npz", num_vertices=N_KEEP)
    with np.load(ict_path) as ref, np.load(fake_out) as built:
        assert sorted(ref.files) == sorted(built.files)
        for key in ref.files:
            if ref[key].dtype.kind == "U":  # string width follows the longest name
                assert built[key].dtype.kind == "U", key
            else:
                assert ref[key].dtype == built[key].dtype, key
            assert ref[key].ndim == built[key].ndim, key


def _fake_repo_path(tmp_path: Path) -> Path:
    _fake_repo(tmp_path / "repo")
    return tmp_path / "repo"


def test_builder_rejects_a_non_repository(tmp_path):
    with pytest.raises(AvatarError, match="vertex_indices.json"):
        build_ict_compact(tmp_path, tmp_path / "x.npz")


# ---------------------------------------------------------------------------------------------
# BFM (Deep3DFaceRecon BFM_model_front.mat layout, real topology, random small bases)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_bfm(assets, tmp_path_factory):
    from scipy.io import loadmat, savemat

    info_path = assets / BFM_INFO_REL
    if not info_path.is_file():
        pytest.skip(f"{info_path} missing")
    info = loadmat(str(info_path))
    v = 35709
    rng = np.random.default_rng(0)
    mean = (rng.normal(size=(v, 3)) * np.array([0.5, 0.6, 0.3]) + np.array([0.01, 0.2, 0.4])).astype(np.float32)
    mat = {
        "meanshape": mean.reshape(1, -1),
        "idBase": (rng.normal(size=(3 * v, 5)) * 1e-2).astype(np.float32),
        "exBase": (rng.normal(size=(3 * v, 4)) * 1e-2).astype(np.float32),
        "meantex": rng.uniform(60, 200, size=(1, 3 * v)).astype(np.float32),
        "texBase": rng.normal(size=(3 * v, 3)).astype(np.float32),
        **{k: info[k] for k in ("tri", "keypoints", "point_buf", "frontmask2_idx", "skinmask", "tri_mask2")},
    }
    folder = tmp_path_factory.mktemp("bfm_models")
    path = folder / "3dmm" / "bfm" / "BFM_model_front.mat"
    path.parent.mkdir(parents=True)
    savemat(str(path), mat)
    return folder, path, mat


def test_bfm_loader(fake_bfm):
    _, path, mat = fake_bfm
    model = load_bfm(path)
    v = 35709
    assert model.name == "bfm" and model.num_vertices == v
    assert model.mean.shape == (v, 3) and model.id_basis.shape == (5, v, 3) and model.exp_basis.shape == (4, v, 3)
    assert model.faces.shape == (70789, 3) and model.faces.dtype == torch.int64
    assert model.faces.tolist()[:3] == (mat["tri"][:3].astype(np.int64) - 1).tolist()
    assert int(model.faces.min()) == 0 and int(model.faces.max()) == v - 1
    assert model.lmk68.tolist() == (mat["keypoints"].reshape(-1).astype(np.int64) - 1).tolist()
    assert model.face_region.shape == (27660,) and int(model.face_region.min()) >= 0
    assert model.exp_range == "gaussian" and model.exp_names is None
    assert model.units_to_mm == 100.0 and model.source_units == "dm"
    assert model.extra["point_buf"].shape == (v, 8) and model.extra["skinmask"].dtype == torch.bool
    # recentred like Deep3DFaceRecon, then in mm
    assert torch.allclose(model.mean.mean(0), torch.zeros(3), atol=1e-3)
    # same shape as Deep3DFaceRecon's compute_shape (x100)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(2, 4, generator=g)
    mean = mat["meanshape"].reshape(-1, 3).astype(np.float64)
    mean = (mean - mean.mean(0, keepdims=True)).reshape(-1)
    d3d = (mat["idBase"] @ a.numpy().T + mat["exBase"] @ b.numpy().T).T + mean
    assert np.allclose(model.vertices(a, b).numpy(), d3d.reshape(2, v, 3) * 100.0, atol=1e-3)
    # albedo in 0..1
    alb = model.albedo()
    assert alb.shape == (1, v, 3) and np.allclose(alb[0].numpy().reshape(-1), mat["meantex"].reshape(-1) / 255.0, atol=1e-6)
    c = torch.randn(1, 3, generator=g)
    expected = (mat["texBase"] @ c.numpy().T).T / 255.0 + mat["meantex"] / 255.0
    assert np.allclose(model.albedo(c).numpy().reshape(1, -1), expected, atol=1e-5)
    assert model.landmarks(model.vertices()).shape == (1, 68, 3)


def test_bfm_found_by_name_in_models_dir(fake_bfm, monkeypatch):
    folder, path, _ = fake_bfm
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    model = load_face_model("bfm", folder)
    assert model.name == "bfm" and model.sha256 == registry.file_sha256(path)
    monkeypatch.setenv("AVATAR_MODELS", str(folder))
    assert load_face_model("bfm").num_vertices == 35709
    assert load_face_model(path, dtype=torch.float64).mean.dtype == torch.float64


def test_bfm_rejects_other_mat_files(tmp_path):
    from scipy.io import savemat

    path = tmp_path / "other.mat"
    savemat(str(path), {"x": np.zeros(3)})
    with pytest.raises(AvatarError, match="meanshape"):
        load_bfm(path)
