"""The artifact kinds, declared once, with the schema types. Stages and ``avatar info`` read them
from here; ``avatarcli.artifact`` validates files against them."""

from __future__ import annotations

from dataclasses import dataclass

from avatarcli.errors import ArtifactError

STR = "str"  # variable-length UTF-8 string dataset


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of an artifact kind."""

    path: str
    """Path relative to the root (root datasets) or to the unit group (unit datasets)."""
    dtype: str
    """numpy dtype name, or ``"str"`` for variable-length UTF-8 strings."""
    shape: tuple[int | str, ...]
    """Symbolic shape: ints are exact sizes, strings are named dimensions."""
    doc: str = ""
    optional: bool = False


@dataclass(frozen=True)
class ArtifactSchema:
    """Everything that makes a file an artifact of one kind, at one schema version."""

    kind: str
    version: int
    doc: str
    datasets: tuple[DatasetSpec, ...] = ()
    """Root-level datasets (indexes and tables)."""
    unit_group: str | None = None
    """Name of the group that holds one subgroup per unit (clip, run, …)."""
    unit_datasets: tuple[DatasetSpec, ...] = ()
    unit_attrs: tuple[str, ...] = ()
    root_attrs: tuple[str, ...] = ()
    """Kind-specific root attributes that must be present."""
    global_symbols: tuple[str, ...] = ()
    """Dimension names shared by every unit (others are re-bound per unit)."""
    unit_count_symbol: str | None = None
    """Root symbol that must equal the number of units (e.g. ``N`` for index datasets)."""

    def spec(self, path: str) -> DatasetSpec:
        for spec in (*self.datasets, *self.unit_datasets):
            if spec.path == path:
                return spec
        raise KeyError(path)


COMMON_ROOT_ATTRS = (
    "avatar_kind",
    "avatar_schema_version",
    "avatar_version",
    "avatar_git_commit",
    "created_utc",
    "config_json",
)
PROVENANCE_DATASETS = (
    DatasetSpec("provenance/parent_path", STR, ("P",), "input paths"),
    DatasetSpec("provenance/parent_sha256", STR, ("P",), "sha256 of each input's content"),
)

_REGISTRY: dict[str, ArtifactSchema] = {}


def register_schema(schema: ArtifactSchema) -> ArtifactSchema:
    _REGISTRY[schema.kind] = schema
    return schema


def get_schema(kind: str) -> ArtifactSchema:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ArtifactError(f"unknown artifact kind {kind!r} (known: {', '.join(sorted(_REGISTRY))})") from None


CLIPS = register_schema(
    ArtifactSchema(
        kind="clips",
        version=1,
        doc="Face clips: fixed-fps, nose-centred square crops with landmarks, one group per clip.",
        datasets=(
            DatasetSpec("index/clip_id", STR, ("N",), "group name of each clip under /clips"),
            DatasetSpec("index/identity_id", "int32", ("N",), "row of /identities for each clip"),
            DatasetSpec("index/num_frames", "int32", ("N",), "frames of each clip"),
            DatasetSpec("index/source_id", "int32", ("N",), "row of /sources each clip came from"),
            DatasetSpec("identities/name", STR, ("I",), "identity names; a clip's identity_id indexes this"),
            DatasetSpec("sources/path", STR, ("V",), "every input, in processing order"),
            DatasetSpec("sources/sha256", STR, ("V",), "content hash of each input ('' when unreadable)"),
            DatasetSpec("sources/status", STR, ("V",), "'ok' or 'skipped'"),
            DatasetSpec("sources/reason", STR, ("V",), "why an input was skipped, or notes on an ok one"),
            DatasetSpec("sources/num_clips", "int32", ("V",), "clips made from each input"),
        ),
        unit_group="clips",
        unit_datasets=(
            DatasetSpec("frames", "uint8", ("T", "S", "S", 3), "RGB crops, one frame per chunk, deflate"),
            DatasetSpec("boxes", "float32", ("T", 4), "crop square (x0, y0, x1, y1) in source pixels"),
            DatasetSpec("kps5", "float32", ("T", 5, 2), "SCRFD 5 points (eyes, nose, mouth corners), crop pixels"),
            DatasetSpec("lmk68", "float32", ("T", 68, 2), "iBUG-68 landmarks in crop pixels"),
            DatasetSpec("det_score", "float32", ("T",), "detector score (0 where interpolated)"),
            DatasetSpec("detected", "bool", ("T",), "True where the face was detected, False where interpolated"),
            DatasetSpec("landmarked", "bool", ("T",), "True where the landmark model ran, False where interpolated"),
            DatasetSpec("timestamps", "float64", ("T",), "output frame times in seconds of the source"),
            DatasetSpec("source_frame", "int64", ("T",), "decoded source frame index of each output frame"),
            # Ground truth of synthetic clips (avatar synth); absent for real videos.
            DatasetSpec("truth/identity", "float32", ("KI",), "face-model identity coefficients", optional=True),
            DatasetSpec("truth/expression", "float32", ("T", "KE"), "expression coefficients per frame", optional=True),
            DatasetSpec("truth/pose6", "float32", ("T", 6), "(pitch, yaw, roll, tx, ty, tz) radians, mm", optional=True),
            DatasetSpec("truth/lighting", "float32", ("T", 9, 3), "SH lighting (camera-attached)", optional=True),
            DatasetSpec("truth/albedo", "float32", ("V", 3), "per-vertex albedo in 0..1", optional=True),
            DatasetSpec("truth/intrinsics", "float32", (3, 3), "pinhole K in crop pixels", optional=True),
            # Rendered clips (avatar render); absent otherwise.
            DatasetSpec("driving_frame", "int64", ("T",), "frame of the driving clip each frame renders; avatar eval "
                        "compares frame t with reference frame driving_frame[t]", optional=True),
        ),
        unit_attrs=(
            "source_path", "source_fps", "fps", "identity", "identity_id", "segment",
            "source_width", "source_height",
        ),
        root_attrs=("crop_size", "fps"),
        global_symbols=("S",),
        unit_count_symbol="N",
    )
)

COEFFS = register_schema(
    ArtifactSchema(
        kind="coeffs",
        version=1,
        doc="Per-frame 3D morphable model fits of a clips artifact, one group per clip.",
        datasets=(
            DatasetSpec("index/clip_id", STR, ("N",), "group name of each fitted clip under /coeffs (= its clip id)"),
            DatasetSpec("index/num_frames", "int32", ("N",), "frames of each fitted clip"),
            DatasetSpec("index/lmk_error", "float32", ("N",), "mean landmark reprojection error of each clip, px"),
            DatasetSpec("skipped/clip_id", STR, ("M",), "clips of the input that were not fitted"),
            DatasetSpec("skipped/reason", STR, ("M",), "why each was skipped"),
        ),
        unit_group="coeffs",
        unit_datasets=(
            DatasetSpec("identity", "float32", ("T", "KI"), "identity coefficients (one vector per clip, repeated)"),
            DatasetSpec("expression", "float32", ("T", "KE"), "expression coefficients"),
            DatasetSpec("rotation", "float32", ("T", 3), "head rotation (pitch, yaw, roll), radians"),
            DatasetSpec("translation", "float32", ("T", 3), "head translation in OpenCV camera axes, mm"),
            DatasetSpec("lighting", "float32", ("T", 9, 3), "second-order SH lighting, camera-attached"),
            DatasetSpec("camera25", "float32", ("T", 25), "EG3D camera: cam2world (mm) and normalised intrinsics"),
            DatasetSpec("pose6", "float32", ("T", 6), "(pitch, yaw, roll, tx, ty, tz)"),
            DatasetSpec("intrinsics", "float32", ("T", 3, 3), "pinhole K in crop pixels"),
            DatasetSpec("lmk_error", "float32", ("T",), "mean 68-landmark reprojection error, px"),
            DatasetSpec("flagged", "bool", ("T",), "True where lmk_error exceeds the flag threshold"),
            DatasetSpec("albedo", "float32", ("V", 3), "per-vertex albedo of the clip, 0..1 (absent for imported "
                        "Deep3DFaceRecon coefficients, whose texture basis is not available)", optional=True),
        ),
        unit_attrs=("clip_id", "fps", "crop_size"),
        root_attrs=("face_model", "face_model_sha256", "crop_size"),
        global_symbols=("KI", "KE", "V"),
        unit_count_symbol="N",
    )
)

EVAL = register_schema(
    ArtifactSchema(
        kind="eval",
        version=1,
        doc="Metric values of a generated artifact against a reference, per frame, per clip and overall, "
        "with the protocol of every metric (root attrs protocol_json, summary_json).",
        datasets=(
            DatasetSpec("index/clip_id", STR, ("N",), "generated clip of each evaluated pair (group name under /eval)"),
            DatasetSpec("index/reference_clip", STR, ("N",), "reference clip it was compared with"),
            DatasetSpec("index/source_clip", STR, ("N",), "source clip of CSIM in cross-id mode ('' otherwise)"),
            DatasetSpec("index/num_frames", "int32", ("N",), "frame pairs of each clip pair"),
            DatasetSpec("metrics/name", STR, ("M",), "the metrics computed, in column order of index/clip_mean"),
            DatasetSpec("index/clip_mean", "float64", ("N", "M"), "per-clip mean of each metric over its "
                        "included frames (nan where none was included)"),
            DatasetSpec("index/clip_included", "int32", ("N", "M"), "frames included per clip and metric"),
            DatasetSpec("reasons/text", STR, ("R",), "exclusion reasons; row 0 is '' (included)"),
        ),
        unit_group="eval",
        unit_datasets=(
            DatasetSpec("generated_frame", "int32", ("T",), "frame index in the generated clip"),
            DatasetSpec("reference_frame", "int32", ("T",), "frame index in the reference clip"),
            DatasetSpec("values", "float64", ("T", "M"), "metric values per frame pair; nan where excluded"),
            DatasetSpec("excluded", "uint8", ("T", "M"), "0 = included; else the row of /reasons/text why not"),
        ),
        unit_attrs=("clip_id", "reference_clip"),
        root_attrs=("protocol_json", "summary_json"),
        global_symbols=("M",),
        unit_count_symbol="N",
    )
)

ENCODER = register_schema(
    ArtifactSchema(
        kind="encoder",
        version=1,
        doc="A trained expression encoder (CLeBS): weights, architecture, basis V, training provenance, probe scores.",
        datasets=(
            DatasetSpec("weights/name", STR, ("W",), "state_dict key of each tensor"),
            DatasetSpec("weights/shape_json", STR, ("W",), "JSON list: the shape of each tensor"),
            DatasetSpec("weights/dtype", STR, ("W",), "torch dtype name of each tensor (restored on load)"),
            DatasetSpec("weights/offset", "int64", ("W",), "start of each tensor in weights/flat"),
            DatasetSpec("weights/flat", "float32", ("F",), "every tensor, flattened and concatenated"),
            DatasetSpec("basis", "float32", ("D", "NB"), "V: orthonormal basis of the expression latent (columns)"),
            DatasetSpec("beta_mean", "float32", ("K",), "mean of the training expression vectors (input standardisation)"),
            DatasetSpec("beta_std", "float32", ("K",), "std of the training expression vectors"),
            DatasetSpec("training/step", "int64", ("L",), "steps at which the loss was recorded"),
            DatasetSpec("training/loss", "float32", ("L",), "InfoNCE loss (mean over ranks)"),
            DatasetSpec("training/accuracy", "float32", ("L",), "top-1 frame-to-β matching accuracy within a group"),
            DatasetSpec("training/clip_id", STR, ("C",), "clips trained on"),
            DatasetSpec("training/identity", STR, ("C",), "identity of each clip"),
            DatasetSpec("training/num_frames", "int32", ("C",), "frames of each clip"),
            DatasetSpec("probe/metric", STR, ("M",), "probe score names (see probe/doc)"),
            DatasetSpec("probe/beta", "float64", ("M",), "score on the raw expression β"),
            DatasetSpec("probe/beta_prime", "float64", ("M",), "score on the encoder output β′"),
            DatasetSpec("probe/doc", STR, ("M",), "what each score measures"),
        ),
        root_attrs=(
            "encoder_type", "shape_json", "expr_dim", "latent_dim", "basis_size", "image_size", "steps",
            "skipped_steps", "world_size", "input_kind",
            "probe_identity_chance", "probe_identity_acc_beta", "probe_identity_acc_beta_prime",
            "probe_expression_r2_beta", "probe_expression_r2_beta_prime",
        ),
    )
)

EXPR_EMBEDDINGS = register_schema(
    ArtifactSchema(
        kind="expr_embeddings",
        version=1,
        doc="Per-frame expression embeddings β′ (and λ) of an encoder for every clip of its input.",
        datasets=(
            DatasetSpec("index/clip_id", STR, ("N",), "group name of each clip under /clips"),
            DatasetSpec("index/identity", STR, ("N",), "identity of each clip"),
            DatasetSpec("index/num_frames", "int32", ("N",), "frames of each clip"),
        ),
        unit_group="clips",
        unit_datasets=(
            DatasetSpec("beta", "float32", ("T", "K"), "input expression vectors"),
            DatasetSpec("lambda", "float32", ("T", "NB"), "coefficients λ along the basis"),
            DatasetSpec("beta_prime", "float32", ("T", "D"), "β′ = V λ"),
        ),
        unit_attrs=("clip_id", "identity"),
        root_attrs=("encoder_path", "encoder_sha256"),
        global_symbols=("K", "NB", "D"),
        unit_count_symbol="N",
    )
)

GENERATOR = register_schema(
    ArtifactSchema(
        kind="generator",
        version=1,
        doc="A trained Export3D tri-plane generator (avatar train-recon): weights, shape, expression mode, the "
        "encoder it was conditioned through, the data it saw, training curves and validation metrics.",
        datasets=(
            DatasetSpec("weights/name", STR, ("W",), "state_dict key of each tensor (Export3DGenerator)"),
            DatasetSpec("weights/shape_json", STR, ("W",), "JSON list: the shape of each tensor"),
            DatasetSpec("weights/dtype", STR, ("W",), "torch dtype name of each tensor (restored on load)"),
            DatasetSpec("weights/offset", "int64", ("W",), "start of each tensor in weights/flat"),
            DatasetSpec("weights/flat", "float32", ("F",), "every tensor, flattened and concatenated"),
            DatasetSpec("data/clip_id", STR, ("C",), "clips trained on"),
            DatasetSpec("data/identity", STR, ("C",), "identity of each clip"),
            DatasetSpec("data/num_frames", "int32", ("C",), "frames of each clip"),
            DatasetSpec("data/train_frames", "int32", ("C",), "the first train_frames frames were trained on; "
                        "the rest were held out for validation"),
            DatasetSpec("training/step", "int64", ("L",), "steps at which the losses were recorded"),
            DatasetSpec("training/loss", "float32", ("L",), "total loss (sum over the phases, mean over ranks)"),
            DatasetSpec("validation/step", "int64", ("V",), "steps at which the validation ran"),
            DatasetSpec("validation/metric", STR, ("M",), "validation metric names (columns of validation/value)"),
            DatasetSpec("validation/value", "float64", ("V", "M"), "validation metrics per validation step"),
        ),
        root_attrs=(
            "preset", "shape_json", "expression", "expr_dim", "image_size", "encoder_path", "encoder_sha256",
            "world_scale", "steps", "world_size", "precision", "losses_json", "validation_protocol",
            "train_identities_json", "val_identities_json",
        ),
    )
)
