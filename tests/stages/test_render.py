"""avatar render: same-id and cross-id reenactment with a tiny (untrained) generator, the copy-the-source
baseline, frame selection, cameras, videos, bad inputs, and the render -> eval pipe (frames aligned by
driving_frame)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from avatarcli.errors import AvatarError
from tests.conftest import REPO
from tests.stages.test_eval import cli_process, write_clips

SIZE, CROP, K = 64, 72, 6
"""Generator image size, crop size of the driving clips (resized to SIZE), expression size."""
LENGTHS = {"a": 8, "b": 6}
TRAIN_FRAMES = 5
"""Clip a: frames 0..4 trained, 5..7 held out (the generator never saw clip b)."""


def smooth_frames(count: int, seed: int) -> np.ndarray:
    """uint8 [count,CROP,CROP,3]: a different smooth colour pattern per frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:CROP, 0:CROP] / CROP
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(0.5, 4, 3)
        rgb = [np.sin(a * x + b * y + c + k) for k in range(3)]
        out.append(np.stack(rgb, -1) * 100 + 128)
    return np.clip(out, 0, 255).astype(np.uint8)


def cameras_mm(count: int, seed: int) -> np.ndarray:
    """[count,25] fitted-style cameras (mm): a head 1000 mm in front of the camera, small yaw."""
    from avatarcli.camera import eg3d_camera, intrinsics_matrix, pose6_to_rt

    rng = np.random.default_rng(seed)
    pose6 = np.zeros((count, 6), np.float32)
    pose6[:, 1] = rng.uniform(-0.2, 0.2, count)
    pose6[:, 5] = 1000.0
    R, t = pose6_to_rt(torch.from_numpy(pose6))
    return eg3d_camera(R, t, intrinsics_matrix(900.0, CROP / 2, CROP / 2), CROP).numpy().astype(np.float32)


def write_coeffs(path: Path, clips: dict[str, int], k: int = K, drop_camera: str = "") -> Path:
    """A coeffs artifact with random β [T,k] and cameras (the datasets render reads are real)."""
    from avatarcli.artifact import ArtifactWriter, write_strings
    from avatarcli.schemas import COEFFS

    with ArtifactWriter(path, COEFFS, {"kind": "coeffs"}, [],
                        extra_attrs={"face_model": "ict", "face_model_sha256": "", "crop_size": CROP}) as writer:
        units = writer.handle.create_group("coeffs", track_order=True)
        for seed, (name, count) in enumerate(clips.items()):
            rng = np.random.default_rng(seed)
            group = units.create_group(name)
            arrays = {"identity": np.zeros((count, 4)), "expression": rng.normal(size=(count, k)),
                      "rotation": np.zeros((count, 3)), "translation": np.zeros((count, 3)),
                      "lighting": np.zeros((count, 9, 3)), "camera25": cameras_mm(count, seed),
                      "pose6": np.zeros((count, 6)), "intrinsics": np.tile(np.eye(3), (count, 1, 1)),
                      "lmk_error": np.zeros(count)}
            for key, value in arrays.items():
                group.create_dataset(key, data=np.asarray(value, np.float32))
            group.create_dataset("flagged", data=np.zeros(count, bool))
            group.attrs.update({"clip_id": name, "fps": 25.0, "crop_size": CROP})
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", list(clips))
        index.create_dataset("num_frames", data=np.asarray(list(clips.values()), np.int32))
        index.create_dataset("lmk_error", data=np.zeros(len(clips), np.float32))
        skipped = writer.handle.create_group("skipped")
        write_strings(skipped, "clip_id", [])
        write_strings(skipped, "reason", [])
    if drop_camera:  # a broken fit: camera25 missing in a clip that is not the first (validated lazily)
        with h5py.File(path, "a") as handle:
            del handle["coeffs"][drop_camera]["camera25"]
    return path


def write_tiny_generator(path: Path, drv_coeffs: Path) -> Path:
    """A tiny raw-β generator with random weights, written by the train-recon artifact writer; it
    'trained' on clip a's first TRAIN_FRAMES frames."""
    from avatarcli.camera import generator_world_scale
    from avatarcli.export3d.artifact import write_generator
    from avatarcli.export3d.generator import Export3DGenerator, GeneratorShape

    torch.manual_seed(0)
    shape = GeneratorShape.from_preset("tiny", expr_dim=K)
    model = Export3DGenerator(shape).eval()
    with h5py.File(drv_coeffs) as handle:
        cams = torch.from_numpy(np.concatenate([handle["coeffs"][c]["camera25"][()] for c in LENGTHS]))
    data = SimpleNamespace(clips=[SimpleNamespace(clip_id="a", identity="alice", num_frames=LENGTHS["a"],
                                                  train_frames=TRAIN_FRAMES)],
                           world_scale=generator_world_scale(cams), parents=[], train_identities=["alice"],
                           val_identities=[])
    return write_generator(path, model, shape, preset="tiny", expression="raw", config_json={"test": True}, data=data,
                           history={"step": [], "loss": []}, losses={}, validation_protocol="none (test)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    drv = write_clips(root / "drv.h5", {n: smooth_frames(t, i) for i, (n, t) in enumerate(LENGTHS.items())},
                      {"a": "alice", "b": "bob"})
    drvc = write_coeffs(root / "drvc.h5", LENGTHS)
    src = write_clips(root / "src.h5", {"c": smooth_frames(5, 7)}, {"c": "carol"})
    srcc = write_coeffs(root / "srcc.h5", {"c": 5})
    gen = write_tiny_generator(root / "gen.h5", drvc)
    return SimpleNamespace(root=root, drv=drv, drvc=drvc, src=src, srcc=srcc, gen=gen)


def render(world, out, driving_coeffs=True, **settings):
    from stages.render import RenderConfig, run

    paths = {k: settings.pop(k) for k in ("source", "source_coeffs", "pairs") if k in settings}
    config = RenderConfig(device="cpu", **settings)
    return run(config, world.gen, world.drv, out, world.drvc if driving_coeffs else None, **paths)


def read_clip(path, name):
    with h5py.File(path) as handle:
        group = handle["clips"][name]
        return {key: group[key][()] for key in group}, dict(group.attrs)


def test_same_id_frames_are_the_generator_forward(world, tmp_path):
    from avatarcli.artifact import open_artifact
    from avatarcli.camera import to_generator_camera
    from avatarcli.export3d.artifact import load_generator
    from avatarcli.export3d.drive import frames_to_images, images_to_frames
    from avatarcli.schemas import CLIPS

    out = tmp_path / "same.h5"
    summary = render(world, out, batch_frames=3, source_frame=2)
    assert summary.details["clips"] == ["a", "b"] and summary.frames == sum(LENGTHS.values())
    with open_artifact(out, CLIPS.kind, deep=True) as handle:
        assert int(handle.attrs["crop_size"]) == SIZE and float(handle.attrs["fps"]) == 25.0
    data, attrs = read_clip(out, "a")
    assert data["frames"].shape == (LENGTHS["a"], SIZE, SIZE, 3)
    np.testing.assert_array_equal(data["driving_frame"], np.arange(LENGTHS["a"]))
    assert np.isnan(data["lmk68"]).all() and not data["detected"].any() and not data["det_score"].any()
    assert (attrs["driving_clip"], attrs["source_clip"], attrs["source_frame_index"]) == ("a", "a", 2)
    assert attrs["identity"] == "alice"
    # frame t = G(source frame 2 of clip a, β_t, driving camera t), computed here independently
    loaded = load_generator(world.gen)
    with h5py.File(world.drv) as d, h5py.File(world.drvc) as c:
        source = frames_to_images(torch.from_numpy(d["clips/a/frames"][2:3]), SIZE)
        beta = torch.from_numpy(c["coeffs/a/expression"][()])
        cams = to_generator_camera(torch.from_numpy(c["coeffs/a/camera25"][()]), loaded.world_scale)
    with torch.no_grad():
        expected = images_to_frames(loaded.model(source.expand(len(beta), -1, -1, -1), loaded.condition(beta),
                                                 cams)["image"]).numpy()
    assert np.abs(expected.astype(int) - data["frames"]).max() <= 1  # batches of 3 vs 8: rounding only
    assert data["frames"].std() > 0


def test_cross_id_pairs_and_source_camera(world, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("driving,source\nb,c\n")
    out = tmp_path / "cross.h5"
    render(world, out, source=world.src, pairs=pairs, source_coeffs=world.srcc, camera="source")
    data, attrs = read_clip(out, "b__from__c")
    assert data["frames"].shape == (LENGTHS["b"], SIZE, SIZE, 3) and attrs["identity"] == "carol"
    assert (attrs["driving_clip"], attrs["source_clip"]) == ("b", "c")
    with h5py.File(out) as handle:
        assert list(handle["clips"]) == ["b__from__c"] and list(handle["identities/name"].asstr()[()]) == ["carol"]
    # without --pairs a one-clip source drives every driving clip
    summary = render(world, tmp_path / "all.h5", source=world.src, clips=("a",))
    assert summary.details["clips"] == ["a__from__c"]


def test_cameras(world):
    from avatarcli.camera import to_generator_camera
    from avatarcli.export3d.drive import job_cameras, parse_camera

    cams = cameras_mm(5, 3)
    driving = job_cameras(parse_camera("driving"), cams, None, 0.01)
    torch.testing.assert_close(driving, to_generator_camera(torch.from_numpy(cams), 0.01))
    source = job_cameras(parse_camera("source"), cams, cams[1], 0.01)
    torch.testing.assert_close(source, driving[1:2].expand(5, 25))
    orbit = job_cameras(parse_camera("orbit:20"), cams, None, 0.01)
    centres = orbit[:, [3, 7, 11]]
    torch.testing.assert_close(centres.norm(dim=1), torch.full((5,), 2.7))
    yaw = torch.rad2deg(torch.atan2(centres[:, 0], centres[:, 2]))
    torch.testing.assert_close(yaw, torch.linspace(-20, 20, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(orbit[:, 16:], driving[:, 16:])  # the driving intrinsics
    fixed = job_cameras(parse_camera("yaw=10,pitch=-5"), cams, None, 0.01)
    assert torch.allclose(fixed[0], fixed[-1]) and math.isclose(float(fixed[0, [3, 7, 11]].norm()), 2.7, rel_tol=1e-5)


def test_copy_source_held_out_and_videos(world, tmp_path):
    import av

    from avatarcli.export3d.drive import resize_frames

    out, videos = tmp_path / "copy.h5", tmp_path / "videos"
    render(world, out, copy_source=True, frames="held-out", clips=("a",), mp4=str(videos), compare=True)
    data, attrs = read_clip(out, "a")
    np.testing.assert_array_equal(data["driving_frame"], np.arange(TRAIN_FRAMES, LENGTHS["a"]))
    with h5py.File(world.drv) as handle:
        source = handle["clips/a/frames"][0]
        np.testing.assert_array_equal(data["timestamps"], handle["clips/a/timestamps"][TRAIN_FRAMES:])
    assert (data["frames"] == resize_frames(source[None], SIZE)).all()
    with av.open(str(videos / "a.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == LENGTHS["a"] - TRAIN_FRAMES and decoded[0].shape == (SIZE, 3 * SIZE, 3)
    with pytest.raises(AvatarError, match="never saw clip 'b'"):
        render(world, tmp_path / "b.h5", copy_source=True, frames="held-out", clips=("b",))
    # without --clips, held-out renders every clip the generator trained on and skips the others
    summary = render(world, tmp_path / "all.h5", copy_source=True, frames="held-out")
    assert summary.details["clips"] == ["a"] and [name for name, _ in summary.skipped] == ["b"]
    summary = render(world, tmp_path / "range.h5", frames="2:4", clips=("b",), camera="orbit:15",
                     mp4=str(videos))
    assert read_clip(tmp_path / "range.h5", "b")[0]["driving_frame"].tolist() == [2, 3]
    assert summary.details["videos"] == [str(videos / "b.mp4")]


def test_render_eval_pipe_aligns_driving_frames(world, tmp_path):
    """`avatar render ... | avatar eval -`: copy-source frame 0 vs reference frames 5..7 of clip a."""
    from avatarcli.evaluation.frames import to_size
    from avatarcli.metrics.image import psnr

    out, ev = tmp_path / "pipe.h5", tmp_path / "eval.h5"
    command = (f"{sys.executable} -m avatarcli render {world.gen} --driving {world.drv} --copy-source --frames "
               f"held-out --clips a -o {out} --device cpu | {sys.executable} -m avatarcli eval - --reference "
               f"{world.drv} --metrics psnr,ssim -o {ev} --device cpu --json")
    done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(ev) as handle:
        np.testing.assert_array_equal(handle["eval/a/reference_frame"][()], np.arange(TRAIN_FRAMES, LENGTHS["a"]))
        values = handle["eval/a/values"][()]
    with h5py.File(out) as g, h5py.File(world.drv) as r:
        generated = torch.from_numpy(g["clips/a/frames"][()])
        reference = to_size(torch.from_numpy(r["clips/a/frames"][TRAIN_FRAMES:]), SIZE)
    np.testing.assert_allclose(values[:, 0], psnr(generated, reference).double().numpy(), rtol=1e-6)
    # the same generated frames compared by index (frames 0..2) would score differently
    unaligned = psnr(generated, to_size(torch.from_numpy(smooth_frames(LENGTHS["a"], 0)[:3]), SIZE))
    assert not np.allclose(values[:, 0], unaligned.double().numpy())


def test_eval_reads_reference_frames_at_indices(world):
    from avatarcli.artifact import FrameReader
    from avatarcli.evaluation.frames import read_frames_at

    reader = FrameReader()
    try:
        with h5py.File(world.drv) as handle:
            frames = handle["clips/a/frames"]
            index = np.array([5, 6, 1, 2, 3, 7])
            out = read_frames_at(reader, frames, index, np.empty((6, CROP, CROP, 3), np.uint8))
            np.testing.assert_array_equal(out, frames[()][index])
    finally:
        reader.close()


def test_bad_inputs_give_one_clear_line(world, tmp_path):
    k5 = write_coeffs(tmp_path / "k5.h5", LENGTHS, k=5)
    nocam = write_coeffs(tmp_path / "nocam.h5", LENGTHS, drop_camera="b")
    cases = [
        (dict(clips=("zzz",)), "driving clip 'zzz' is not in"),
        (dict(source_frame=7), "--source-frame 7: source clip 'b' has 6 frames"),
        (dict(frames="3:99", clips=("b",)), "clip 'b' has only 6 frames"),
        (dict(edit="0=2"), "trained on raw β"),
        (dict(camera="orbit:x"), "--camera must be"),
        (dict(camera="source", source=world.src), "--camera source needs"),
    ]
    for settings, message in cases:
        with pytest.raises(AvatarError, match=message):
            render(world, tmp_path / "x.h5", **settings)
    with pytest.raises(AvatarError, match="--driving-coeffs is needed"):
        render(world, tmp_path / "x.h5", driving_coeffs=False)
    from stages.render import RenderConfig, run

    for coeffs, message in ((k5, "has 5 expression coefficients; this generator takes 6"),
                            (nocam, "clip 'b' has no camera25")):
        with pytest.raises(AvatarError, match=message):
            run(RenderConfig(device="cpu"), world.gen, world.drv, tmp_path / "x.h5", coeffs)
    assert not (tmp_path / "x.h5").exists()
    # through the CLI: wrong kinds are one line, exit 2, no traceback
    done = cli_process("render", world.gen, "--driving", world.drvc, "--driving-coeffs", world.drvc,
                       "-o", tmp_path / "y.h5", "--device", "cpu")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--driving must be a clips artifact" in lines[0]


def test_clebs_edits(world, tmp_path):
    """--edit 1=0 renders G(S, β′ without λ_1); a basis index too large is one line."""
    from avatarcli.camera import to_generator_camera
    from avatarcli.export3d.artifact import load_generator, write_generator
    from avatarcli.export3d.drive import Driver, frames_to_images, images_to_frames
    from avatarcli.export3d.generator import Export3DGenerator, GeneratorShape
    from avatarcli.provenance import sha256_file
    from stages.render import RenderConfig, run
    from tests.stages.test_train_recon import write_tiny_encoder

    encoder = write_tiny_encoder(tmp_path / "enc.h5", K)
    torch.manual_seed(0)
    shape = GeneratorShape.from_preset("tiny", expr_dim=8)  # the tiny encoder's β′ size
    plain = load_generator(world.gen)
    data = SimpleNamespace(clips=[], world_scale=plain.world_scale, parents=[], train_identities=[], val_identities=[])
    gen = write_generator(tmp_path / "g.h5", Export3DGenerator(shape).eval(), shape, preset="tiny", expression="clebs",
                          config_json={}, data=data, history={"step": [], "loss": []}, losses={},
                          validation_protocol="none", encoder_path=encoder, encoder_sha256=sha256_file(encoder))
    out = tmp_path / "edit.h5"
    run(RenderConfig(device="cpu", edit="1=0", clips=("b",), frames="0:3"), gen, world.drv, out, world.drvc)
    loaded = load_generator(gen)
    with h5py.File(world.drv) as d, h5py.File(world.drvc) as c:
        source = frames_to_images(torch.from_numpy(d["clips/b/frames"][0:1]), SIZE).expand(3, -1, -1, -1)
        beta = torch.from_numpy(c["coeffs/b/expression"][:3])
        cams = to_generator_camera(torch.from_numpy(c["coeffs/b/camera25"][:3]), loaded.world_scale)
    edited = Driver(loaded, "cpu", edits=((1, 0.0),)).condition(beta)
    torch.testing.assert_close(edited, loaded.condition_edit(beta, [(1, 0.0)]))
    assert (edited - loaded.condition(beta)).abs().max() > 1e-3  # λ_1 removed: another β′
    with torch.no_grad():
        expected = images_to_frames(loaded.model(source, edited, cams)["image"]).numpy()
    assert np.abs(read_clip(out, "b")[0]["frames"].astype(int) - expected).max() <= 1
    with pytest.raises(AvatarError, match="--edit index 3 is outside the CLeBS basis 0..2"):
        run(RenderConfig(device="cpu", edit="3=2"), gen, world.drv, tmp_path / "x.h5", world.drvc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_rendering(world):
    """Driver on CUDA replays one captured graph per batch size (smaller batches padded): every batch
    size, the padded remainder and a second replay give the frames of the eager forward."""
    from avatarcli.camera import to_generator_camera
    from avatarcli.export3d.artifact import load_generator
    from avatarcli.export3d.drive import Driver

    loaded = load_generator(world.gen, "cuda")
    graphed, eager = Driver(loaded, "cuda"), Driver(loaded, "cuda", graphs=False)
    frame = torch.from_numpy(smooth_frames(1, 3)[0])
    source = graphed.source(frame)
    generator = torch.Generator().manual_seed(1)
    cams = to_generator_camera(torch.from_numpy(cameras_mm(8, 2)), loaded.world_scale)
    for count in (8, 3, 8, 1):
        beta = torch.randn(count, K, generator=generator)
        expected = eager.render(source, beta, cams[:count])
        got = graphed.render(source, beta, cams[:count])
        assert got.shape == expected.shape
        assert (got.int() - expected.int()).abs().max() <= 1
    assert sorted(graphed._captured) == [8]  # 3 and 1 were padded to 8
