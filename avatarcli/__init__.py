"""avatar: a command-line toolkit for building and evaluating 3D face avatars."""

__version__ = "0.1.0"
