"""Errors that reach the user as one clear line (the CLI adds a traceback only with --debug)."""


class AvatarError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


class ArtifactError(AvatarError):
    """An artifact is missing, of the wrong kind, or does not match its schema."""


class ModelNotFoundError(AvatarError):
    """A registered model cannot be found locally and cannot be downloaded."""
