"""Does a CSIM model separate people? Same-identity vs different-identity cosine on real videos.

Runs the exact CSIM path of ``avatar eval`` (detector -> 5 points -> ArcFace alignment -> embedding)
on every ``--step``-th frame of each video, then compares all frame pairs from different videos:
pairs of the same identity (named by the file name, up to ``_clip``) against pairs of different
identities. Prints JSON with both means, their spread, and the ROC AUC of the separation.

    python examples/csim_separation.py ../shared/assets/data/styletalk --csim-model mobilefacenet_arcface
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def identity_of(path: Path) -> str:
    return re.sub(r"_clip.*$", "", path.stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="folder searched recursively for .mp4 face videos")
    parser.add_argument("--step", type=int, default=10, help="use every Nth frame")
    parser.add_argument("--max-frames", type=int, default=20, help="frames per video at most")
    parser.add_argument("--csim-model", default="auto")
    parser.add_argument("--models", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch
    from decord import VideoReader, cpu

    from avatarcli.devices import resolve_device
    from avatarcli.evaluation.frames import load_face_analysis
    from avatarcli.evaluation.plan import resolve_csim_model
    from stages.eval import EvalConfig

    device = resolve_device(args.device)
    config = EvalConfig(models_dir=args.models, device=device, csim_model=args.csim_model)
    model = resolve_csim_model(config)
    analyzer = load_face_analysis(config, device, model)
    videos = sorted({p.resolve() for p in Path(args.folder).rglob("*.mp4")})
    embeddings, owners, clips, missed = [], [], [], 0
    for clip, video in enumerate(videos):
        reader = VideoReader(str(video), ctx=cpu(0))
        picks = list(range(0, len(reader), args.step))[: args.max_frames]
        frames = torch.from_numpy(reader.get_batch(picks).asnumpy()).to(device)
        found = analyzer.analyse(frames, with_embeddings=True)
        keep = found["found"].nonzero()[:, 0]
        missed += len(frames) - len(keep)
        embeddings.append(found["embeddings"][keep].cpu())
        owners += [identity_of(video)] * len(keep)
        clips += [clip] * len(keep)
    emb = torch.cat(embeddings).double()
    cos = (emb @ emb.T).numpy()
    owners, clips = np.array(owners), np.array(clips)
    other_clip = clips[:, None] != clips[None, :]
    upper = np.triu(np.ones_like(cos, dtype=bool), 1) & other_clip
    same = cos[upper & (owners[:, None] == owners[None, :])]
    diff = cos[upper & (owners[:, None] != owners[None, :])]
    # ROC AUC = P(same-pair cosine > different-pair cosine), by ranks
    ranks = np.argsort(np.argsort(np.concatenate([same, diff]))) + 1
    auc = (ranks[: len(same)].sum() - len(same) * (len(same) + 1) / 2) / (len(same) * len(diff))
    print(json.dumps({
        "csim_model": model, "videos": len(videos), "identities": len(set(owners)), "frames": len(owners),
        "frames_without_face": missed, "device": device,
        "same_identity": {"pairs": int(len(same)), "mean": float(same.mean()), "std": float(same.std()),
                          "min": float(same.min())},
        "different_identity": {"pairs": int(len(diff)), "mean": float(diff.mean()), "std": float(diff.std()),
                               "max": float(diff.max())},
        "roc_auc": float(auc),
        "pairs": "frames of different videos only (same-video pairs would flatter the model)",
    }, indent=2))


if __name__ == "__main__":
    main()
