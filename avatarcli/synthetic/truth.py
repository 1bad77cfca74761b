"""The ground truth of synthetic clips (``avatar synth``) as a coeffs artifact: what a perfect
``avatar fit-3dmm`` would write, so trainers and evaluations can run on synthetic data without a fit."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from avatarcli.errors import AvatarError


def write_truth_coeffs(clips: str | Path, out: str | Path) -> Path:
    """The coeffs artifact ``out`` holding the ground truth of the synthetic clips artifact ``clips``
    (``truth/`` of every clip: identity, expression, pose, lighting, intrinsics; camera25 from them)."""
    from avatarcli.artifact import ArtifactWriter, read_strings, write_strings
    from avatarcli.camera import eg3d_camera, pose6_to_rt
    from avatarcli.provenance import sha256_file
    from avatarcli.schemas import COEFFS

    clips, out = Path(clips), Path(out)
    with h5py.File(clips, "r") as handle:
        size = int(handle.attrs["crop_size"])
        names = read_strings(handle["index/clip_id"])
        missing = [name for name in names if "truth" not in handle["clips"][name]]
        if missing:
            raise AvatarError(f"{clips}: clip {missing[0]!r} has no ground truth (not made by avatar synth)")
        truth = {name: {key: handle["clips"][name]["truth"][key][()] for key in handle["clips"][name]["truth"]}
                 for name in names}
    with ArtifactWriter(out, COEFFS, {"kind": "coeffs", "from": "synth truth"}, [(str(clips), sha256_file(clips))],
                        extra_attrs={"face_model": "ict", "face_model_sha256": "", "crop_size": size}) as writer:
        units = writer.handle.create_group("coeffs", track_order=True)
        for name in names:
            t = truth[name]
            frames = len(t["expression"])
            pose6 = torch.from_numpy(t["pose6"]).double()
            R, trans = pose6_to_rt(pose6)
            K = torch.from_numpy(t["intrinsics"]).double()[None].expand(frames, 3, 3)
            arrays = {"identity": np.repeat(t["identity"][None], frames, 0), "expression": t["expression"],
                      "rotation": t["pose6"][:, :3], "translation": t["pose6"][:, 3:], "lighting": t["lighting"],
                      "camera25": eg3d_camera(R, trans, K, size).numpy(), "pose6": t["pose6"],
                      "intrinsics": K.numpy(), "lmk_error": np.zeros(frames), "flagged": np.zeros(frames, bool)}
            group = units.create_group(name)
            for key, value in arrays.items():
                group.create_dataset(key, data=np.asarray(value, bool if key == "flagged" else np.float32))
            group.attrs.update({"clip_id": name, "fps": 25.0, "crop_size": size})
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", names)
        index.create_dataset("num_frames", data=np.asarray([len(truth[n]["expression"]) for n in names], np.int32))
        index.create_dataset("lmk_error", data=np.zeros(len(names), np.float32))
        skipped = writer.handle.create_group("skipped")
        write_strings(skipped, "clip_id", [])
        write_strings(skipped, "reason", [])
    return out
