"""Training: one engine (``engine``) shared by every trainer, and the models and data they train.

``engine`` runs the loop (precision, compile, clipping, EMA, checkpoints, resume, DDP, TensorBoard,
NaN guard, signals); a trainer supplies a ``TrainTask`` (model, optimizer, batch of a step, loss).
"""
