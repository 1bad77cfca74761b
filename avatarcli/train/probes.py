"""How much appearance an expression code leaks, and how much expression it keeps.

Both probes are linear and scored on held-out frames: every clip is split in time, its first
``train_fraction`` for fitting and its last ``test_fraction`` for scoring (the frames in between are
left out, so neighbouring, nearly identical frames do not straddle the split).

* Identity leak: multinomial logistic regression from the code to the clip's identity; the score is
  the balanced accuracy (mean recall over identities), so chance is exactly 1 / #identities whatever
  the class sizes.
* Expression retention (needs 68 landmarks, i.e. a clips artifact): ridge regression from the code
  to two landmark measures of the expression, mouth opening (inner-lip gap / mouth width) and eye
  opening (eye aspect ratio, both eyes averaged). Each measure is centred per clip (minus its median
  over the clip's training frames), which removes the person's neutral mouth and eye shape, so only
  the expression is to be predicted. The score is R² on the held-out frames, averaged over the two.
* β retention (any input): ridge regression from the code to the per-clip-centred β (its
  within-clip, i.e. expression, variation), R² over all dimensions on held-out frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    train: np.ndarray
    """[F] bool: frames used for fitting."""
    test: np.ndarray
    """[F] bool: held-out frames used for scoring."""
    clip_index: np.ndarray
    """[F] int: clip of each frame."""


def temporal_split(lengths: list[int], train_fraction: float = 0.7, test_fraction: float = 0.25) -> Split:
    train, test, clip_index = [], [], []
    for clip, length in enumerate(lengths):
        t = np.arange(length)
        train.append(t < int(round(train_fraction * length)))
        test.append(t >= length - int(round(test_fraction * length)))
        clip_index.append(np.full(length, clip))
    return Split(np.concatenate(train), np.concatenate(test), np.concatenate(clip_index))


def _standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mean = x[train].mean(0)
    std = x[train].std(0)
    return (x - mean) / np.where(std > 1e-8, std, 1.0)


def identity_probe(features: np.ndarray, labels: np.ndarray, split: Split, l2: float = 1e-3,
                   iters: int = 200) -> float:
    """Balanced held-out accuracy of a multinomial logistic regression (L-BFGS, L2 ``l2``)."""
    x = torch.as_tensor(_standardise(features.astype(np.float64), split.train))
    y = torch.as_tensor(labels, dtype=torch.long)
    classes = int(labels.max()) + 1
    xtr, ytr = x[split.train], y[split.train]
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ weight + bias, ytr) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (x[split.test] @ weight + bias).argmax(1).numpy()
    truth = labels[split.test]
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    return float(np.mean(recalls))


def ridge_r2(features: np.ndarray, targets: np.ndarray, split: Split, alpha: float = 1.0) -> float:
    """R² on the held-out frames of a ridge regression (standardised features), pooled over the
    target columns (1 − Σ residual² / Σ (target − its mean)²)."""
    x = _standardise(features.astype(np.float64), split.train)
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    y = targets.astype(np.float64)
    xtr, ytr = x[split.train], y[split.train]
    reg = alpha * np.eye(x.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    coef = np.linalg.solve(xtr.T @ xtr + reg, xtr.T @ ytr)
    residual = y[split.test] - x[split.test] @ coef
    total = y[split.test] - y[split.test].mean(0)
    return float(1.0 - (residual**2).sum() / max((total**2).sum(), 1e-12))


def landmark_expression(lmk68: np.ndarray) -> np.ndarray:
    """[T,68,2] iBUG-68 landmarks -> [T,2]: mouth opening and eye opening (scale-free ratios)."""
    def dist(a, b):
        return np.linalg.norm(lmk68[:, a] - lmk68[:, b], axis=-1)

    mouth_width = np.maximum(dist(60, 64), 1e-6)
    mouth = (dist(61, 67) + dist(62, 66) + dist(63, 65)) / (3 * mouth_width)
    left = (dist(37, 41) + dist(38, 40)) / (2 * np.maximum(dist(36, 39), 1e-6))
    right = (dist(43, 47) + dist(44, 46)) / (2 * np.maximum(dist(42, 45), 1e-6))
    return np.stack([mouth, (left + right) / 2], 1)


def centre_per_clip(values: np.ndarray, split: Split) -> np.ndarray:
    """Subtract from every frame the median of its clip's training frames."""
    out = values.astype(np.float64).copy()
    for clip in np.unique(split.clip_index):
        rows = split.clip_index == clip
        out[rows] -= np.median(values[rows & split.train], axis=0)
    return out


@dataclass
class ProbeScores:
    identities: int
    chance: float
    identity_beta: float
    identity_beta_prime: float
    identity_beta_pca: float
    """Control: identity accuracy from β reduced (PCA) to as many dimensions as the basis, so the drop
    from β to β′ can be told apart from a mere loss of dimensions."""
    expression_beta: float
    """Landmark expression R² from β (nan without landmarks)."""
    expression_beta_prime: float
    beta_retention_beta_prime: float
    """R² of the per-clip-centred β from β′."""
    pose_beta: float
    """Diagnostic: R² of the per-clip-centred head rotation from β (pose leaking into β; nan without pose)."""
    pose_beta_prime: float
    train_frames: int
    test_frames: int

    def rows(self) -> list[tuple[str, float, float, str]]:
        """(metric, on β, on β′, doc) for the artifact."""
        return [
            ("identity_balanced_accuracy", self.identity_beta, self.identity_beta_prime,
             f"held-out balanced accuracy of a linear identity classifier; chance {self.chance:.4f}"),
            ("identity_chance", self.chance, self.chance, f"1 / {self.identities} identities"),
            ("identity_balanced_accuracy_pca", self.identity_beta_pca, self.identity_beta_prime,
             "control: β column is β reduced by PCA to the basis size"),
            ("expression_r2_landmarks", self.expression_beta, self.expression_beta_prime,
             "held-out R² of ridge regression to per-clip-centred mouth opening and eye opening (68 landmarks)"),
            ("beta_retention_r2", 1.0, self.beta_retention_beta_prime,
             "held-out R² of ridge regression to the per-clip-centred β (β column: 1 by definition)"),
            ("pose_r2", self.pose_beta, self.pose_beta_prime,
             "diagnostic: held-out R² of ridge regression to the per-clip-centred head rotation (pose leak)"),
        ]


def run_probes(beta: np.ndarray, beta_prime: np.ndarray, lengths: list[int], identity_labels: np.ndarray,
               lmk68: np.ndarray | None, basis_size: int, pose: np.ndarray | None = None) -> ProbeScores:
    """All probes on frames of clips concatenated in order (``lengths`` frames each)."""
    split = temporal_split(lengths)
    identities = int(len(np.unique(identity_labels)))
    nan = float("nan")
    if identities >= 2:
        id_beta = identity_probe(beta, identity_labels, split)
        id_prime = identity_probe(beta_prime, identity_labels, split)
        centred = _standardise(beta.astype(np.float64), split.train)
        _, _, vt = np.linalg.svd(centred[split.train], full_matrices=False)
        id_pca = identity_probe(centred @ vt[:basis_size].T, identity_labels, split)
    else:
        id_beta = id_prime = id_pca = nan
    if lmk68 is not None:
        targets = centre_per_clip(landmark_expression(lmk68), split)
        expr_beta, expr_prime = ridge_r2(beta, targets, split), ridge_r2(beta_prime, targets, split)
    else:
        expr_beta = expr_prime = nan
    beta_ret = ridge_r2(beta_prime, centre_per_clip(beta, split), split)
    if pose is not None:
        pose_target = centre_per_clip(pose, split)
        pose_beta, pose_prime = ridge_r2(beta, pose_target, split), ridge_r2(beta_prime, pose_target, split)
    else:
        pose_beta = pose_prime = nan
    return ProbeScores(identities, 1.0 / max(identities, 1), id_beta, id_prime, id_pca, expr_beta, expr_prime,
                       beta_ret, pose_beta, pose_prime, int(split.train.sum()), int(split.test.sum()))
