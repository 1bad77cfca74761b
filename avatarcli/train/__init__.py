"""Training: one engine shared by every trainer, the tasks it trains, and their models and data.

``engine`` runs the loop (phases, accumulation, precision, compile, clipping, EMA, validation,
checkpoints, resume, DDP, TensorBoard, NaN guard, signals) with ``checkpoint``, ``distributed``,
``hooks``/``params`` (work between backward and step; parameters that change size), ``ema`` and
``validation``; a trainer supplies a ``task.TrainTask`` (``tasks/``: CLeBS).
"""
