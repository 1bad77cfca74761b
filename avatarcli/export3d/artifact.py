"""The ``generator`` artifact (``avatar train-recon``'s output) and its loader.

Weights as one flat float32 dataset (``avatarcli.train.clebs.flatten_state``, as the encoder
artifact), the :class:`GeneratorShape` as JSON, the expression mode ('clebs': β -> β′ through the
frozen CLeBS encoder named by path and sha256; 'raw': β itself), the generator-world scale, the data
seen (``data/*``: clips with their trained and held-out frame counts), curves and validation metrics
with their protocol, and which losses were active (``LossSet.describe()``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatarcli.errors import AvatarError
from avatarcli.train.clebs import LoadedEncoder, flatten_state, unflatten_state

EXPRESSION_MODES = ("clebs", "raw")


def _write_weights(handle, model: torch.nn.Module) -> None:
    from avatarcli.artifact import write_strings

    weights = flatten_state(dict(model.state_dict()))
    group = handle.create_group("weights")
    for key in ("name", "shape_json", "dtype"):
        write_strings(group, key, weights[key])
    group.create_dataset("offset", data=weights["offset"])
    group.create_dataset("flat", data=weights["flat"])


def _validation_table(history: dict[str, list[float]]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps [V], metric names [M], values [V,M]) of the engine history's ``validation/*`` columns."""
    steps = np.asarray(history.get("validation/step", []), np.int64)
    names = sorted(k.removeprefix("validation/") for k in history if k.startswith("validation/") and k != "validation/step")
    values = np.full((len(steps), len(names)), np.nan, np.float64)
    for column, name in enumerate(names):
        series = history[f"validation/{name}"]
        values[: len(series), column] = series
    return steps, names, values


def write_generator(output: str | Path, model: torch.nn.Module, shape, *, preset: str, expression: str,
                    config_json: dict, data, history: dict[str, list[float]], losses: dict,
                    validation_protocol: str, encoder_path: str | Path | None = None,
                    encoder_sha256: str = "", steps: int = 0, world_size: int = 1, precision: str = "fp32",
                    extra_attrs: dict | None = None) -> Path:
    """Write a generator artifact.

    Args:
        model: the trained ``Export3DGenerator`` (its EMA copy when there is one).
        shape: its ``GeneratorShape``.
        data: the ``ReconData`` it trained on (clips, identities, world_scale, parents).
        history: the engine's ``TrainResult.history`` (curves and ``validation/*`` columns).
        losses: ``LossSet.describe()`` of the reconstruction losses (plus any adversarial entry).
        validation_protocol: what the validation metrics measure (frames, pairs, metric definitions).
        encoder_path, encoder_sha256: the CLeBS encoder of 'clebs' mode ('' / None in 'raw' mode).
    """
    from avatarcli.artifact import ArtifactWriter, write_strings
    from avatarcli.schemas import GENERATOR

    if expression not in EXPRESSION_MODES:
        raise AvatarError(f"expression must be one of {', '.join(EXPRESSION_MODES)}, not {expression!r}")
    output = Path(output)
    parents = list(data.parents)
    if encoder_path:
        parents = [(str(Path(encoder_path).absolute()), encoder_sha256)] + parents
    attrs = {
        "preset": preset,
        "shape_json": json.dumps(asdict(shape)),
        "expression": expression,
        "expr_dim": int(shape.expr_dim),
        "image_size": int(shape.image_size),
        "encoder_path": str(Path(encoder_path).absolute()) if encoder_path else "",
        "encoder_sha256": encoder_sha256 or "",
        "world_scale": float(data.world_scale),
        "steps": int(steps),
        "world_size": int(world_size),
        "precision": precision,
        "losses_json": json.dumps(losses, sort_keys=True),
        "validation_protocol": validation_protocol,
        "train_identities_json": json.dumps(list(data.train_identities)),
        "val_identities_json": json.dumps(list(data.val_identities)),
        **(extra_attrs or {}),
    }
    val_steps, val_names, val_values = _validation_table(history)
    with ArtifactWriter(output, GENERATOR, config_json, parents, attrs) as writer:
        h = writer.handle
        _write_weights(h, model)
        group = h.create_group("data")
        write_strings(group, "clip_id", [c.clip_id for c in data.clips])
        write_strings(group, "identity", [c.identity for c in data.clips])
        group.create_dataset("num_frames", data=np.asarray([c.num_frames for c in data.clips], np.int32))
        group.create_dataset("train_frames", data=np.asarray([c.train_frames for c in data.clips], np.int32))
        training = h.create_group("training")
        training.create_dataset("step", data=np.asarray(history.get("step", []), np.int64))
        training.create_dataset("loss", data=np.asarray(history.get("loss", []), np.float32))
        for key, series in history.items():  # per-phase losses and terms: extra curves
            if key in ("step", "loss") or key.startswith("validation/"):
                continue
            training.create_dataset(key.replace("/", "_"), data=np.asarray(series, np.float32))
        validation = h.create_group("validation")
        validation.create_dataset("step", data=val_steps)
        write_strings(validation, "metric", val_names)
        validation.create_dataset("value", data=val_values.reshape(len(val_steps), len(val_names)))
    return output


@dataclass
class LoadedGenerator:
    """A generator artifact, ready to render: ``model(source, loaded.condition(beta), cameras)``."""

    model: torch.nn.Module
    """The ``Export3DGenerator``, in eval mode, requires_grad False."""
    shape: object
    """Its ``GeneratorShape``."""
    expression: str
    """'clebs' (conditioned on β′ from ``encoder``) or 'raw' (on β)."""
    encoder: LoadedEncoder | None
    world_scale: float
    """Generator units per face-model mm (``avatarcli.camera.to_generator_camera``)."""
    attrs: dict = field(default_factory=dict)
    held_out: dict[str, tuple[int, int]] = field(default_factory=dict)
    """clip_id -> (train_frames, num_frames): frames ``train_frames..num_frames-1`` were never trained on."""

    @torch.no_grad()
    def condition(self, beta: torch.Tensor) -> torch.Tensor:
        """β [B,K] -> the generator's expression input [B,expr_dim] (β′ in 'clebs' mode, β in 'raw')."""
        if beta.shape[-1] != self._input_dim():
            raise AvatarError(f"expression coefficients have {beta.shape[-1]} values, this generator takes "
                              f"{self._input_dim()} ({self.expression} mode)")
        if self.encoder is None:
            return beta.float().to(self._device())
        return self.encoder.encode(beta.float()).to(self._device())

    @torch.no_grad()
    def condition_edit(self, beta: torch.Tensor, edits: list[tuple[int, float]]) -> torch.Tensor:
        """β [B,K] -> β′ [B,d] with λ_i scaled by s for each (i, s) of ``edits`` (CLeBS basis editing)."""
        if self.encoder is None:
            raise AvatarError("expression editing needs a CLeBS generator; this one was trained on raw β")
        encoder = self.encoder.expression_encoder
        basis_size = self.encoder.shape.basis_size
        lam = self.encoder.coefficients(beta.float()).float()
        for index, scale in edits:
            if not 0 <= int(index) < basis_size:
                raise AvatarError(f"edit index {index} is outside the CLeBS basis 0..{basis_size - 1}")
            lam[..., int(index)] = lam[..., int(index)] * float(scale)
        return (lam @ encoder.basis().T).to(self._device())

    def _input_dim(self) -> int:
        return self.encoder.shape.expr_dim if self.encoder is not None else int(self.shape.expr_dim)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_generator(path: str | Path, device: str | torch.device = "cpu",
                   encoder_path: str | Path | None = None) -> LoadedGenerator:
    """Rebuild the generator of a ``generator`` artifact (eval mode, frozen) with its CLeBS encoder.

    ``encoder_path``: where the encoder is now, if it moved (its sha256 must still match the one
    recorded); default the recorded path.
    """
    from avatarcli.artifact import open_artifact, read_strings
    from avatarcli.export3d.generator import Export3DGenerator, GeneratorShape
    from avatarcli.provenance import sha256_file
    from avatarcli.schemas import GENERATOR
    from avatarcli.train.clebs import load_encoder

    with open_artifact(path, GENERATOR.kind) as handle:
        shape = GeneratorShape.from_dict(json.loads(handle.attrs["shape_json"]))
        state = unflatten_state(read_strings(handle["weights/name"]), read_strings(handle["weights/shape_json"]),
                                read_strings(handle["weights/dtype"]), handle["weights/offset"][()],
                                handle["weights/flat"][()])
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in handle.attrs.items()}
        held_out = dict(zip(read_strings(handle["data/clip_id"]),
                            zip(handle["data/train_frames"][()].tolist(), handle["data/num_frames"][()].tolist())))
    model = Export3DGenerator(shape)
    model.load_state_dict(state)
    model = model.to(device).eval().requires_grad_(False)
    expression = str(attrs["expression"])
    encoder = None
    if expression == "clebs":
        where = Path(encoder_path or attrs["encoder_path"])
        if not where.is_file():
            raise AvatarError(f"{path}: its CLeBS encoder {where} is missing (pass the encoder's new path)")
        digest = sha256_file(where)
        if digest != attrs["encoder_sha256"]:
            raise AvatarError(f"{where} is not the encoder {path} was trained with (sha256 {digest[:12]}…, "
                              f"expected {str(attrs['encoder_sha256'])[:12]}…)")
        encoder = load_encoder(where, device)
    world_scale = float(attrs["world_scale"])
    if not math.isfinite(world_scale) or world_scale <= 0:
        raise AvatarError(f"{path}: world_scale {world_scale} is not a positive number")
    return LoadedGenerator(model, shape, expression, encoder, world_scale, attrs, held_out)
