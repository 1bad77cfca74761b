"""Synthetic face clips with ground truth (the algorithms of ``avatar synth``).

``sampling``: what is drawn per clip, from ``(seed, clip)`` only (host, numpy + the float64 camera
and SH functions); ``caps``: rendering-only geometry closing the eye and mouth openings; ``render``:
:class:`~avatarcli.synthetic.render.Synthesizer` (geometry, rasterize + shade, composite; torch).
Importing this package does not import torch.
"""

from avatarcli.synthetic.caps import Caps, boundary_loops, find_caps
from avatarcli.synthetic.render import SynthClip, Synthesizer, clip_names, kps5_from_lmk68
from avatarcli.synthetic.sampling import ClipTruth, ModelArrays, fit_light_range, sample_clip, smooth_signals

__all__ = [
    "Caps", "boundary_loops", "find_caps", "SynthClip", "Synthesizer", "clip_names", "kps5_from_lmk68", "ClipTruth",
    "ModelArrays", "fit_light_range", "sample_clip", "smooth_signals",
]
