"""The stage contract shared by every stage (torch-free; see ``spec`` for the phases)."""

from avatarcli.stage.config import StageConfig, option, result_hash, setting
from avatarcli.stage.context import NullProgress, Progress, RunContext
from avatarcli.stage.files import atomic_path, remove_stale_temps
from avatarcli.stage.parts import PartsStore, existing_output_matches, parts_folder, unit_key
from avatarcli.stage.spec import InputSpec, Stage, StageSpec
from avatarcli.stage.summary import Summary

__all__ = [
    "StageConfig", "option", "setting", "result_hash", "RunContext", "Progress", "NullProgress", "atomic_path",
    "remove_stale_temps", "PartsStore", "existing_output_matches", "parts_folder", "unit_key", "InputSpec",
    "Stage", "StageSpec", "Summary",
]
