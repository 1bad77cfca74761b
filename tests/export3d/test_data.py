"""Export3D training data (avatarcli.export3d.data) on small `avatar synth` clips with a coeffs artifact
written from their ground truth: identity choice, held-out frames, sampling balance, determinism,
the frame bank and bad inputs."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avatarcli import camera as cam
from avatarcli.artifact import ArtifactWriter, read_strings, write_strings
from avatarcli.errors import AvatarError
from avatarcli.export3d.data import choose_identities, load_recon_data
from avatarcli.schemas import COEFFS

ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"
SIZE = 32
FRAMES = 10
SHORTER = {"synth_s0_0001": 5, "synth_s0_0002": 3}  # clip -> frames kept (clip lengths differ)
JOINED = ("synth_s0_0006", "synth_s0_0000")  # the first clip is given the second's identity


def _truncate(group: h5py.Group, count: int) -> None:
    """Keep the first ``count`` frames of every per-frame dataset of a clip group."""
    old = group["frames"].shape[0]
    paths: list[str] = []
    group.visititems(lambda path, item: paths.append(path) if isinstance(item, h5py.Dataset) else None)
    for path in paths:
        dataset = group[path]
        if dataset.shape[:1] != (old,):
            continue
        data = dataset[:count]
        options = dict(chunks=(1, *dataset.shape[1:]) if dataset.chunks else None,
                       compression=dataset.compression, compression_opts=dataset.compression_opts)
        del group[path]
        group.create_dataset(path, data=data, **options)


@pytest.fixture(scope="module")
def synth_clips(assets, tmp_path_factory, cpu_threads):
    """7 synthetic clips of 6 identities (one identity has 2 clips), 10, 5 or 3 frames, 32² crops."""
    from stages.synth import SynthConfig, run

    path = tmp_path_factory.mktemp("recon") / "clips.h5"
    run(SynthConfig(clips=7, frames=FRAMES, size=SIZE, seed=0, face_model=str(assets / ICT), device="cpu",
                    batch_frames=16, supersample=1), path)
    with h5py.File(path, "r+") as handle:
        names = read_strings(handle["index/clip_id"])
        for name, count in SHORTER.items():
            _truncate(handle["clips"][name], count)
            handle["index/num_frames"][names.index(name)] = count
        moved, target = (handle["clips"][n] for n in JOINED)
        moved.attrs["identity"] = target.attrs["identity"]
        moved.attrs["identity_id"] = target.attrs["identity_id"]
        handle["index/identity_id"][names.index(JOINED[0])] = target.attrs["identity_id"]
    return path


def write_truth_coeffs(clips_path, out, rename: str = "", drop_frame: str = "") -> None:
    """A coeffs artifact holding the clips' ground truth (as fit-3dmm would write a perfect fit)."""
    names, counts = [], []
    with h5py.File(clips_path) as clips, ArtifactWriter(
            out, COEFFS, {"kind": "coeffs"}, [(str(clips_path), "")],
            extra_attrs={"face_model": "ict", "face_model_sha256": "", "crop_size": SIZE}) as writer:
        units = writer.handle.create_group("coeffs", track_order=True)
        for name in read_strings(clips["index/clip_id"]):
            truth = clips["clips"][name]["truth"]
            pose6 = torch.from_numpy(truth["pose6"][()])
            if name == drop_frame:
                pose6 = pose6[:-1]
            T = len(pose6)
            R, t = cam.pose6_to_rt(pose6)
            K = torch.from_numpy(truth["intrinsics"][()])
            group = units.create_group(rename + name)
            arrays = {
                "identity": np.tile(truth["identity"][()], (T, 1)), "expression": truth["expression"][:T],
                "rotation": pose6[:, :3].numpy(), "translation": pose6[:, 3:].numpy(),
                "lighting": truth["lighting"][:T], "camera25": cam.eg3d_camera(R, t, K, SIZE).numpy(),
                "pose6": pose6.numpy(), "intrinsics": np.tile(K.numpy(), (T, 1, 1)),
                "lmk_error": np.zeros(T, np.float32), "flagged": np.zeros(T, bool),
            }
            for key, value in arrays.items():
                group.create_dataset(key, data=np.asarray(value, bool if key == "flagged" else np.float32))
            group.attrs.update({"clip_id": rename + name, "fps": 25.0, "crop_size": SIZE})
            names.append(rename + name)
            counts.append(T)
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", names)
        index.create_dataset("num_frames", data=np.asarray(counts, np.int32))
        index.create_dataset("lmk_error", data=np.zeros(len(names), np.float32))
        skipped = writer.handle.create_group("skipped")
        write_strings(skipped, "clip_id", [])
        write_strings(skipped, "reason", [])


@pytest.fixture(scope="module")
def coeffs(synth_clips):
    path = synth_clips.parent / "coeffs.h5"
    write_truth_coeffs(synth_clips, path)
    return path


def _identities(path) -> dict[str, str]:
    with h5py.File(path) as handle:
        return {name: str(handle["clips"][name].attrs["identity"]) for name in read_strings(handle["index/clip_id"])}


def _held_out_rows(data) -> set[int]:
    return {c.offset + t for c in data.clips for t in range(c.train_frames, c.num_frames)}


def test_ids_pick_a_stable_seeded_subset(synth_clips, coeffs):
    identities = sorted(set(_identities(synth_clips).values()))
    assert len(identities) == 6
    first = load_recon_data(synth_clips, coeffs, 16, ids=3, val_ids=2, val_frames=1, seed=0)
    again = load_recon_data(synth_clips, coeffs, 16, ids=3, val_ids=2, val_frames=1, seed=0)
    other = load_recon_data(synth_clips, coeffs, 16, ids=3, val_ids=2, val_frames=1, seed=1)
    assert first.train_identities == again.train_identities and first.val_identities == again.val_identities
    assert (first.train_identities, first.val_identities) != (other.train_identities, other.val_identities)
    for data in (first, other):
        assert len(data.train_identities) == 3 and len(data.val_identities) == 2
        assert not set(data.train_identities) & set(data.val_identities)
        assert {c.identity for c in data.clips} == set(data.train_identities)
    # the documented rule: sorted names permuted by default_rng(seed); val first, then the trained ones
    order = [identities[i] for i in np.random.default_rng(0).permutation(6)]
    assert first.val_identities == sorted(order[:2]) and first.train_identities == sorted(order[2:5])
    # ids=0 trains every identity that is not held out; more ids than identities is an error
    assert choose_identities(identities, 0, 2, 0)[0] == sorted(order[2:])
    # the trained set only grows with --ids, and --val-ids stays put (stable for a seed)
    many = [f"person{i:04d}" for i in range(1000)]
    small, held = choose_identities(many, 10, 5, 7)
    large, held_large = choose_identities(many, 100, 5, 7)
    assert set(small) <= set(large) and held == held_large


def test_held_out_frames_and_identities_never_trained(synth_clips, coeffs):
    data = load_recon_data(synth_clips, coeffs, 16, ids=0, val_ids=2, val_frames=2, seed=2)
    identities = _identities(synth_clips)
    chosen = choose_identities(list(identities.values()), 0, 2, 2)[0]
    assert identities["synth_s0_0002"] in chosen and identities["synth_s0_0001"] in chosen
    # the 3-frame clip keeps 1 training frame: skipped with its reason (its identity has no other clip)
    assert data.skipped == [("synth_s0_0002", "3 frames: fewer than 2 left to train on after holding out the last 2")]
    assert data.train_identities == sorted(set(chosen) - {identities["synth_s0_0002"]})
    assert all(c.train_frames == c.num_frames - 2 for c in data.clips)
    assert [c.num_frames for c in data.clips if c.clip_id == "synth_s0_0001"] == [5]
    held = _held_out_rows(data)
    assert len(held) == 2 * len(data.clips)
    seen_source, seen_driving = set(), set()
    for step in range(150):
        batch = data.batch(seed=5, step=step, items=range(8))
        seen_source |= set(batch.source_index.tolist())
        seen_driving |= set(batch.driving_index.tolist())
        assert (batch.source_index != batch.driving_index).all()
        clips = data.frame_clip[batch.source_index]
        assert (clips == data.frame_clip[batch.driving_index]).all()  # a pair comes from one clip
        trained_as = [data.train_identities[i] for i in batch.identity_index]
        assert trained_as == [data.clips[c].identity for c in clips]
    train_rows = set(range(data.num_frames)) - held
    assert not (seen_source | seen_driving) & held
    assert seen_source == train_rows and seen_driving == train_rows  # every training frame gets drawn
    assert not {data.clips[data.frame_clip[r]].identity for r in seen_source} & set(data.val_identities)
    assert not {c.identity for c in data.clips} & set(data.val_identities)
    # validation pairs: the held-out frames, sources = first training frames, identities interleaved
    pairs = data.validation_pairs()
    assert set(pairs[:, 2].tolist()) == held and set(pairs[:, 1].tolist()) == {c.offset for c in data.clips}
    first = pairs[: len(data.train_identities), 0]
    assert sorted(first.tolist()) == list(range(len(data.train_identities)))
    val = data.validation_batch(5)
    assert val.driving_index.tolist() == pairs[:5, 2].tolist()
    assert torch.equal(val.driving, data.validation_batch(5).driving)


def test_every_identity_equally_likely_whatever_its_frames(synth_clips, coeffs):
    data = load_recon_data(synth_clips, coeffs, 16, ids=0, val_ids=0, val_frames=1, seed=0)
    frames_of = {who: sum(c.train_frames for c in data.clips if c.identity == who) for who in data.train_identities}
    assert len(frames_of) == 6 and max(frames_of.values()) >= 9 * min(frames_of.values())  # 18 vs 2
    draws = 3000
    rows = np.array([data.pair(seed=11, step=k // 8, item=k % 8) for k in range(draws)])
    counts = np.bincount(rows[:, 0], minlength=6)
    expected = draws / 6
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, counts  # 5 degrees of freedom: p ≈ 1e-4
    # within the identity with two clips, each clip in proportion to its training frames (9 and 9)
    two = data.train_identities.index(_identities(synth_clips)[JOINED[1]])
    clips = data.frame_clip[rows[rows[:, 0] == two, 1]]
    assert len(set(clips.tolist())) == 2 and abs(np.mean(clips == clips[0]) - 0.5) < 0.1


def test_batches_are_a_function_of_seed_step_item(synth_clips, coeffs):
    data = load_recon_data(synth_clips, coeffs, SIZE, ids=0, val_ids=1, val_frames=1, seed=0)
    whole = data.batch(seed=2, step=7, items=range(0, 4))
    parts = [data.batch(seed=2, step=7, items=range(0, 2)), data.batch(seed=2, step=7, items=range(2, 4))]
    for name in ("source", "driving", "beta", "camera", "source_camera"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts])), name
    for name in ("source_index", "driving_index", "identity_index"):
        assert np.array_equal(getattr(whole, name), np.concatenate([getattr(p, name) for p in parts])), name
    assert whole.source.shape == (4, 3, SIZE, SIZE) and whole.source.dtype == torch.float32
    assert 0.0 <= float(whole.source.min()) and float(whole.source.max()) <= 1.0
    assert whole.beta.shape == (4, 53) and whole.camera.shape == (4, 25) and data.expr_dim == 53
    assert not np.array_equal(data.batch(seed=2, step=8, items=range(4)).driving_index, whole.driving_index)
    assert not np.array_equal(data.batch(seed=3, step=7, items=range(4)).driving_index, whole.driving_index)
    assert data.loader_throughput(seconds=0.05, batch=4) > 0


def test_bank_frames_beta_and_cameras_match_the_inputs(synth_clips, coeffs):
    data = load_recon_data(synth_clips, coeffs, SIZE, ids=0, val_ids=0, val_frames=2, seed=0)
    small = load_recon_data(synth_clips, coeffs, 16, ids=0, val_ids=0, val_frames=2, seed=0)
    assert data.frames.shape == (data.num_frames, 3, SIZE, SIZE) and data.frames.dtype == torch.uint8
    assert data.crop_size == SIZE and small.frames.shape[-1] == 16
    training_cameras = []
    with h5py.File(synth_clips) as clips, h5py.File(coeffs) as fits:
        for clip in data.clips:
            frames = torch.from_numpy(clips["clips"][clip.clip_id]["frames"][()]).permute(0, 3, 1, 2)
            rows = slice(clip.offset, clip.offset + clip.num_frames)
            assert torch.equal(data.frames[rows], frames)  # crop size = training size: the frames as stored
            resized = F.interpolate(frames.float(), size=(16, 16), mode="bilinear", antialias=True)
            assert (small.frames[rows].float() - resized).abs().max() <= 0.5 + 1e-4
            camera_mm = torch.from_numpy(fits["coeffs"][clip.clip_id]["camera25"][()])
            training_cameras.append(camera_mm[: clip.train_frames])
            assert np.allclose(clip.camera, cam.to_generator_camera(camera_mm, data.world_scale).numpy(), atol=1e-6)
            assert np.array_equal(clip.beta, fits["coeffs"][clip.clip_id]["expression"][()])
            assert torch.equal(data.beta[rows], torch.from_numpy(clip.beta))
    assert data.world_scale == pytest.approx(cam.generator_world_scale(torch.cat(training_cameras)))
    batch = data.batch(seed=0, step=0, items=range(6))
    assert torch.equal(batch.camera, data.camera[torch.from_numpy(batch.driving_index)])
    assert torch.equal(batch.source_camera, data.camera[torch.from_numpy(batch.source_index)])
    radius = data.camera[:, [3, 7, 11]].norm(dim=-1)
    assert 2.4 < float(radius.median()) < 3.0
    signature = data.signature()
    assert signature["train_identities"] == data.train_identities and signature["val_frames"] == 2
    assert [p[1] for p in signature["inputs"]] == [h for _, h in data.parents] and all(len(h) == 64 for _, h in data.parents)


def test_bad_inputs_give_one_clear_error(synth_clips, coeffs, tmp_path):
    def load(clips=synth_clips, fits=coeffs, **changes):
        args = {"image_size": 16, "ids": 0, "val_ids": 1, "val_frames": 1, "seed": 0, **changes}
        return load_recon_data(clips, fits, **args)

    with pytest.raises(AvatarError, match="a coeffs artifact; expected a clips artifact"):
        load(clips=coeffs)
    with pytest.raises(AvatarError, match="a clips artifact; expected a coeffs artifact"):
        load(fits=synth_clips)
    with pytest.raises(AvatarError, match="has 6 identities; --ids 5 with --val-ids 2 needs at least 7"):
        load(ids=5, val_ids=2)
    with pytest.raises(AvatarError, match="--val-frames must be >= 0"):
        load(val_frames=-1)
    with pytest.raises(AvatarError, match="no usable clip among the 5 trained identities"):
        load(val_frames=9)
    short = tmp_path / "short.h5"
    write_truth_coeffs(synth_clips, short, drop_frame="synth_s0_0003")
    with pytest.raises(AvatarError, match="'synth_s0_0003' has coefficients for 9 frames but .* holds 10"):
        load(fits=short, val_ids=0)
    foreign = tmp_path / "foreign.h5"
    write_truth_coeffs(synth_clips, foreign, rename="other_")
    with pytest.raises(AvatarError, match="fits none of the clips"):
        load(fits=foreign)
    for which in ("first", "last"):  # the first unit is also schema-checked on opening: same message
        no_camera = shutil.copy(coeffs, tmp_path / f"no_camera_{which}.h5")
        with h5py.File(no_camera, "r+") as handle:
            name = sorted(handle["coeffs"])[0 if which == "first" else -1]
            del handle["coeffs"][name]["camera25"]
        with pytest.raises(AvatarError, match=f"clip '{name}' has no camera25"):
            load(fits=no_camera, val_ids=0)
    nan = shutil.copy(coeffs, tmp_path / "nan.h5")
    with h5py.File(nan, "r+") as handle:
        for name in handle["coeffs"]:
            handle["coeffs"][name]["expression"][1, 0] = np.nan
    with pytest.raises(AvatarError, match=r"NaN or inf expression coefficients \(β\) at frame 1"):
        load(fits=nan)
    data = load(val_frames=0)
    with pytest.raises(AvatarError, match="no held-out frames"):
        data.validation_batch(4)
