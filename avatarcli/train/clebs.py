"""CLeBS (Export3D §3.1): contrastive pretraining of a learned-basis expression encoder.

* f_I, the image encoder: ResNetSE18 features -> one linear layer -> d.
* f_e, the expression encoder (LeBS): two linear layers map an expression vector β (any dimension:
  64 for BFM / Deep3DFaceRecon, 53 for ICT) to n coefficients λ; the basis V (d x n, orthonormal
  columns) is the Q of a QR decomposition of a learned d x n weight; β′ = Σ_i λ_i v_i = V λ.
* Loss (Eq. 1): InfoNCE between f_I(X_j) and f_e(β_k) over groups of frames of one clip: the
  aligned (frame, β) pair is the positive, the other frames' β of the same clip are the negatives, so
  appearance (constant within a clip) cannot separate them and β′ keeps only what the image shows
  changing: the expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avatarcli.train.nets import ResNetSE18


@dataclass
class ClebsShape:
    """Architecture of a CLeBS model (stored in the encoder artifact to rebuild it)."""

    expr_dim: int
    """Dimension of the input expression vector β."""
    latent_dim: int = 256
    """d: dimension of β′ and of the image embedding."""
    basis_size: int = 10
    """n: number of learned basis vectors (coefficients λ)."""
    hidden: int = 256
    """Width of the hidden layer of f_e."""
    width: int = 64
    """Base width of ResNetSE18 (64 is the standard ResNet-18)."""
    norm: str = "batch"
    """Normalisation in ResNetSE18: 'batch' or 'group'."""


class ExpressionEncoder(nn.Module):
    """f_e (LeBS): β -> λ (two linear layers) and β′ = V λ with V orthonormal (QR of a weight)."""

    def __init__(self, expr_dim: int, latent_dim: int, basis_size: int, hidden: int):
        super().__init__()
        if basis_size > latent_dim:
            raise ValueError(f"basis size {basis_size} exceeds the latent dimension {latent_dim}")
        self.fc1 = nn.Linear(expr_dim, hidden)
        self.fc2 = nn.Linear(hidden, basis_size)
        self.basis_weight = nn.Parameter(torch.randn(latent_dim, basis_size) / latent_dim ** 0.5)
        # β is standardised with the training set's statistics before f_e (stored with the weights).
        self.register_buffer("beta_mean", torch.zeros(expr_dim))
        self.register_buffer("beta_std", torch.ones(expr_dim))

    def basis(self) -> torch.Tensor:
        """V: [d, n] with orthonormal columns. QR's column signs are fixed (diag(R) > 0) so that V
        is a continuous function of the weight."""
        q, r = torch.linalg.qr(self.basis_weight.float())
        signs = torch.sign(torch.diagonal(r))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        return q * signs

    def coefficients(self, beta: torch.Tensor) -> torch.Tensor:
        """λ: [..., n]."""
        x = (beta - self.beta_mean) / self.beta_std
        return self.fc2(F.leaky_relu(self.fc1(x), 0.2))

    def forward(self, beta: torch.Tensor) -> torch.Tensor:
        """β′ = V λ: [..., d]."""
        return self.coefficients(beta).float() @ self.basis().T


class ImageEncoder(nn.Module):
    """f_I: ResNetSE18 features -> one linear layer -> d."""

    def __init__(self, latent_dim: int, width: int, norm: str):
        super().__init__()
        self.backbone = ResNetSE18(width=width, norm=norm)
        self.fc = nn.Linear(self.backbone.out_features, latent_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images))


class Clebs(nn.Module):
    """f_I and f_e together; ``forward`` takes groups of frames and their β."""

    def __init__(self, shape: ClebsShape):
        super().__init__()
        self.shape = shape
        self.image_encoder = ImageEncoder(shape.latent_dim, shape.width, shape.norm)
        self.expression_encoder = ExpressionEncoder(shape.expr_dim, shape.latent_dim, shape.basis_size, shape.hidden)

    def forward(self, images: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,G,3,H,W] (normalised), beta [B,G,K] -> (f_I [B,G,d], f_e [B,G,d])."""
        groups, size = images.shape[:2]
        image_embedding = self.image_encoder(images.flatten(0, 1)).unflatten(0, (groups, size))
        return image_embedding, self.expression_encoder(beta)


def info_nce(image_embedding: torch.Tensor, expr_embedding: torch.Tensor, temperature: float = 0.07
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 over groups: for frame j of a group, −log softmax_k(cos(f_I(X_j), f_e(β_k)) / τ)[j].

    image_embedding, expr_embedding: [B,G,d]; the G frames of a group come from one clip.
    Returns (mean loss, top-1 accuracy of picking the aligned β among the group). Computed in fp32
    (the logits of a bf16 forward would lose the small differences between frames of one clip).
    """
    zi = F.normalize(image_embedding.float(), dim=-1)
    ze = F.normalize(expr_embedding.float(), dim=-1)
    logits = zi @ ze.transpose(1, 2) / temperature  # [B,G,G]
    target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    accuracy = (logits.argmax(-1) == target).float().mean()
    return loss, accuracy


@torch.no_grad()
def edit_expression(encoder: ExpressionEncoder, beta: torch.Tensor, index: int, scale: float) -> torch.Tensor:
    """β′ with its coefficient along basis vector ``index`` scaled: β′ + (scale − 1) λ_i v_i.

    ``scale`` 0 removes that component, 2 doubles it, −1 mirrors it. beta: [..., K] -> [..., d].
    """
    basis_size = encoder.fc2.out_features
    if not 0 <= index < basis_size:
        raise IndexError(f"basis index {index} is outside 0..{basis_size - 1}")
    lam = encoder.coefficients(beta).float()
    lam[..., index] = lam[..., index] * scale
    return lam @ encoder.basis().T


# ------------------------------------------------------------------------------------------------
# the encoder artifact: weights as one flat float32 dataset plus names, shapes and dtypes


def flatten_state(state: dict[str, torch.Tensor]) -> dict[str, object]:
    import json

    import numpy as np

    names, shapes, dtypes, offsets, chunks = [], [], [], [], []
    offset = 0
    for name, tensor in state.items():
        values = tensor.detach().cpu().float().reshape(-1).numpy()
        names.append(name)
        shapes.append(json.dumps(list(tensor.shape)))
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        offsets.append(offset)
        chunks.append(values)
        offset += len(values)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return {"name": names, "shape_json": shapes, "dtype": dtypes, "offset": np.asarray(offsets, np.int64),
            "flat": flat.astype(np.float32)}


def unflatten_state(names: list[str], shapes: list[str], dtypes: list[str], offsets, flat) -> dict[str, torch.Tensor]:
    import json

    import numpy as np

    state = {}
    for name, shape_json, dtype, offset in zip(names, shapes, dtypes, offsets):
        shape = json.loads(shape_json)
        count = int(np.prod(shape)) if shape else 1
        values = torch.from_numpy(np.asarray(flat[int(offset): int(offset) + count])).reshape(shape)
        state[name] = values.to(getattr(torch, dtype))
    return state


@dataclass
class LoadedEncoder:
    model: Clebs
    shape: ClebsShape
    attrs: dict
    """Root attributes of the artifact (probe scores, training provenance)."""

    @property
    def expression_encoder(self) -> ExpressionEncoder:
        return self.model.expression_encoder

    @torch.no_grad()
    def encode(self, beta: torch.Tensor) -> torch.Tensor:
        """β [..., K] -> β′ [..., d]."""
        return self.model.expression_encoder(beta.to(self.model.expression_encoder.beta_mean))

    @torch.no_grad()
    def coefficients(self, beta: torch.Tensor) -> torch.Tensor:
        """β [..., K] -> λ [..., n]."""
        return self.model.expression_encoder.coefficients(beta.to(self.model.expression_encoder.beta_mean))

    def edit(self, beta: torch.Tensor, index: int, scale: float) -> torch.Tensor:
        return edit_expression(self.model.expression_encoder, beta.to(self.model.expression_encoder.beta_mean),
                               index, scale)


def load_encoder(path, device: str | torch.device = "cpu") -> LoadedEncoder:
    """Rebuild the CLeBS model of an encoder artifact (``avatar pretrain-expr`` output), in eval mode."""
    import json

    from avatarcli.artifact import open_artifact, read_strings
    from avatarcli.schemas import ENCODER

    with open_artifact(path, ENCODER.kind) as handle:
        shape = ClebsShape(**json.loads(handle.attrs["shape_json"]))
        state = unflatten_state(read_strings(handle["weights/name"]), read_strings(handle["weights/shape_json"]),
                                read_strings(handle["weights/dtype"]), handle["weights/offset"][()],
                                handle["weights/flat"][()])
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in handle.attrs.items()}
    model = Clebs(shape)
    model.load_state_dict(state)
    return LoadedEncoder(model.to(device).eval().requires_grad_(False), shape, attrs)
