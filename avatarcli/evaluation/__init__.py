"""The algorithms of ``avatar eval`` (the stage in ``stages/eval.py`` orchestrates them).

- ``plan`` (torch-free): metric names and exclusion reasons, the input sides, metric choice, clip
  pairing (:func:`plan_pairs`).
- ``frames``: image and face metrics of a clip pair, in device batches (:func:`evaluate_frames`),
  face-region masks.
- ``coefficients``: landmark fits of analysed clips in streamed batches (:class:`LandmarkFits`),
  AED/APD (:func:`coefficient_distances`).
- ``protocol``: what each number means (:func:`build_protocol`).
- ``artifact``: per-clip and overall means, the eval artifact (:func:`write_eval_artifact`).

The summary table, protocol line and summary files are in :mod:`avatarcli.metrics.report`.
"""
