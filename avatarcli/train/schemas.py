"""Artifact kinds written by the trainers (declared in :mod:`avatarcli.schemas`, re-exported here)."""

from avatarcli.schemas import ENCODER, EXPR_EMBEDDINGS  # noqa: F401
