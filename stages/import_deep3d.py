"""Stage ``import-deep3d``: Deep3DFaceRecon coefficient files (``.mat``, 257-d per frame) -> coeffs artifact.

Many users already have Deep3DFaceRecon fits; importing them lets ``avatar eval`` compute AED/APD
with the Deep3D protocol without re-fitting. Layout of a file's ``coeff`` [T,257]: identity
[0:80], expression [80:144], texture [144:224], angles [224:227] (pitch, yaw, roll, radians),
SH lighting [227:254] (3 channels × 9), translation [254:257] (decimetres).

Stored (see :data:`avatarcli.schemas.COEFFS`): ``identity`` and ``expression`` verbatim;
``rotation`` = the angles verbatim (Deep3DFaceRecon's Euler convention is ours,
:func:`avatarcli.camera.euler_to_matrix`); ``translation`` and ``pose6`` converted to our OpenCV
camera in mm with :func:`avatarcli.camera.deep3d_pose_to_rt` (so ``|Δt| = 100·|Δtrans|`` per axis,
which ``avatar eval`` undoes: its APD translation unit is the decimetre); ``lighting`` [T,9,3];
the 25-d camera and ``intrinsics`` of Deep3DFaceRecon's 224² crop (focal 1015, centre 112). No
per-vertex albedo (the BFM texture basis is not distributed with the coefficients) and no
landmark error (``nan``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from avatarcli.artifact import ArtifactWriter, write_strings
from avatarcli.deep3d import DEEP3D_SLICES, read_deep3d
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import COEFFS
from avatarcli.stage import InputSpec, Stage, StageConfig, StageSpec, Summary, option

READS = "deep3d-mat"
WRITES = COEFFS.kind

DEEP3D_FOCAL, DEEP3D_CENTER, DEEP3D_SIZE = 1015.0, 112.0, 224
FACE_MODEL = "bfm_deep3d"


@dataclass
class ImportDeep3dConfig(StageConfig):
    """Settings of ``avatar import-deep3d``."""

    fps: float = option(30.0, help="Frame rate of the fitted videos (the files do not store it).")
    """Frame rate of the videos the coefficients were fitted on (not stored in the .mat files)."""


def find_mat_files(inputs: list[str]) -> list[Path]:
    """Files and folders (searched recursively for ``*.mat``), sorted, without duplicates."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(path.rglob("*.mat")))
        elif path.exists():
            found.append(path)
        else:
            raise AvatarError(f"input not found: {path}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise AvatarError("no .mat files among the inputs")
    return unique


def coeffs_unit(coeff: np.ndarray) -> dict[str, np.ndarray]:
    """The COEFFS unit arrays of one clip's Deep3DFaceRecon coefficients [T,257]."""
    import torch

    from avatarcli.camera import deep3d_pose_to_rt, eg3d_camera, intrinsics_matrix

    def part(name):
        a, b = DEEP3D_SLICES[name]
        return coeff[:, a:b]

    angles = torch.as_tensor(part("angles"), dtype=torch.float64)
    R, t = deep3d_pose_to_rt(angles, torch.as_tensor(part("translation"), dtype=torch.float64))
    K = intrinsics_matrix(DEEP3D_FOCAL, DEEP3D_CENTER, DEEP3D_CENTER).to(torch.float64)[0]
    frames = len(coeff)
    camera25 = eg3d_camera(R, t, K, DEEP3D_SIZE)
    return {
        "identity": part("identity").copy(),
        "expression": part("expression").copy(),
        "rotation": part("angles").copy(),
        "translation": t.numpy().astype(np.float32),
        "lighting": part("lighting").reshape(frames, 3, 9).transpose(0, 2, 1).copy(),
        "camera25": camera25.numpy().astype(np.float32),
        "pose6": np.concatenate([part("angles"), t.numpy().astype(np.float32)], 1),
        "intrinsics": np.broadcast_to(K.numpy().astype(np.float32), (frames, 3, 3)).copy(),
        "lmk_error": np.full(frames, np.nan, np.float32),
        "flagged": np.zeros(frames, bool),
    }


class ImportDeep3d(Stage):
    """Every ``.mat`` among the inputs (files or folders) becomes one clip named by its file stem.
    One pass and no parts: reading a .mat file is cheap, so a rerun simply redoes it."""

    name, unit = "import-deep3d", "file"

    def __init__(self, config: ImportDeep3dConfig, inputs: list[str], output, progress=None):
        super().__init__(config, Path(output), progress)
        self.inputs = inputs

    def check(self) -> None:
        if self.config.fps <= 0:
            raise AvatarError("--fps must be positive")
        if self.output.exists() and not self.config.overwrite:
            raise AvatarError(f"{self.output} exists; use --overwrite to replace it or choose another output")
        self.files = find_mat_files(self.inputs)
        stems = [p.stem for p in self.files]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise AvatarError(f"two input files share the clip name {duplicates[0]!r}; import them separately")

    def compute(self, ctx) -> None:
        self.read, self.skipped = [], []
        ctx.progress.start(total_units=len(self.files))
        for path in self.files:
            try:
                self.read.append((path, read_deep3d(path), sha256_file(path)))
            except ValueError as exc:
                self.skipped.append((path.stem, f"{path}: {exc}"))
                ctx.progress.unit_done(path.stem, "skipped", str(exc))
                continue
            ctx.progress.advance_frames(len(self.read[-1][1]))
            ctx.progress.unit_done(path.stem, "ok", "")
        if not self.read:
            raise AvatarError("none of the inputs is a readable Deep3DFaceRecon coefficient file: "
                              + "; ".join(reason for _, reason in self.skipped[:3]))

    def write(self, ctx) -> Summary:
        config, skipped = self.config, self.skipped
        config_json = {**asdict(config), "kind": COEFFS.kind, "importer": "deep3d", "slices": DEEP3D_SLICES}
        parents = [(str(path), sha) for path, _, sha in self.read]
        with ArtifactWriter(self.output, COEFFS, config_json, parents,
                            extra_attrs={"face_model": FACE_MODEL, "face_model_sha256": "",
                                         "crop_size": DEEP3D_SIZE}) as writer:
            units = writer.handle.create_group("coeffs", track_order=True)
            for path, coeff, _ in self.read:
                group = units.create_group(path.stem)
                for key, value in coeffs_unit(coeff).items():
                    group.create_dataset(key, data=value)
                group.attrs.update({"clip_id": path.stem, "fps": float(config.fps), "crop_size": DEEP3D_SIZE,
                                    "source_path": str(path)})
            index = writer.handle.create_group("index")
            write_strings(index, "clip_id", [path.stem for path, _, _ in self.read])
            index.create_dataset("num_frames", data=np.asarray([len(c) for _, c, _ in self.read], np.int32))
            index.create_dataset("lmk_error", data=np.full(len(self.read), np.nan, np.float32))
            skip = writer.handle.create_group("skipped")
            write_strings(skip, "clip_id", [n for n, _ in skipped])
            write_strings(skip, "reason", [r for _, r in skipped])
        frames = int(sum(len(c) for _, c, _ in self.read))
        return Summary(self.name, self.output, self.unit, len(self.read), frames, units_now=len(self.read),
                       frames_now=frames, seconds=ctx.elapsed(), skipped=skipped, timings=ctx.timer.as_dict(),
                       device=ctx.device_name)


def run(config: ImportDeep3dConfig, inputs: list[str], output: str | Path, progress=None) -> Summary:
    """Import every ``.mat`` among ``inputs`` (files or folders) as one clip named by its file stem."""
    return ImportDeep3d(config, inputs, output, progress).run()


STAGE = StageSpec(
    name="import-deep3d",
    summary="Deep3DFaceRecon .mat coefficients -> coeffs artifact.  e.g. avatar import-deep3d fits/ -o d3d.h5",
    help=("Import Deep3DFaceRecon result files (.mat with a 257-d 'coeff' per frame; folders are searched "
          "recursively) as a coeffs artifact, one clip per file named by its stem: identity, expression and "
          "angles verbatim; translation, 6-d pose and the 25-d camera in avatar's OpenCV/mm conventions. "
          "avatar eval then computes AED/APD on them with the Deep3D protocol, without re-fitting. "
          "Unreadable files are skipped with a reason."),
    epilog="Example: avatar import-deep3d gen_3dmm/ -o gen.h5 && avatar eval gen.h5 -r ref.h5 --metrics aed,apd",
    config=ImportDeep3dConfig,
    run=run,
    inputs=(InputSpec("inputs", ".mat files or folders; '-' reads paths from stdin.", many=True, stdin=True),),
    unit="file",
    common=("overwrite",),
    order=50,
)
