"""Stage settings as dataclasses: one source for every default, the CLI and the result hash.

A field made with :func:`option` changes the result (it is hashed into ``result_hash`` and a rerun
with another value does not reuse earlier parts); one made with :func:`setting` does not (device,
output handling, previews). The metadata also names the command-line flag, so the CLI is generated
from the config (``avatarcli.cli.stages``) and cannot drift from it. Torch-free: ``avatar --help``
imports this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from avatarcli.registry import MODELS_OPTION_HELP

META = "avatar"


def option(default: Any = dataclasses.MISSING, *, help: str = "", flag: str | None = None,
           aliases: tuple[str, ...] = (), short: str | None = None, cli: bool = True, result: bool = True,
           choices: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING,
           parse: Any = None, show: Any = None) -> Any:
    """A config field that changes the result.

    ``flag``: the CLI spelling (default ``--field-name``); ``aliases``: older spellings, accepted
    but hidden; ``cli=False``: not settable from the command line; ``choices``: allowed values;
    ``parse``/``show``: convert the CLI string to the field value and back (e.g. a comma list to a
    tuple) — the CLI default is ``show(default)``.
    """
    meta = {META: {"help": help, "flag": flag, "aliases": tuple(aliases), "short": short, "cli": cli,
                   "result": result, "choices": choices, "parse": parse, "show": show}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def setting(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that does not change the result (device, output handling, previews...)."""
    return option(default, result=False, **kwargs)


def field_meta(field: dataclasses.Field) -> dict:
    """The metadata of ``option``/``setting``; a plain dataclass field counts as a result option."""
    return field.metadata.get(META) or {"help": "", "flag": None, "aliases": (), "short": None, "cli": True,
                                        "result": True, "choices": None, "parse": None, "show": None}


def flag_of(field: dataclasses.Field) -> str:
    return field_meta(field)["flag"] or "--" + field.name.replace("_", "-")


def result_hash(value: Any) -> str:
    """The one hash of a stage's result-affecting settings (16 hex digits of a sha256 of sorted JSON)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class StageConfig:
    """Settings every stage has. None of them changes the result."""

    models_dir: str | None = setting(None, flag="--models",
                                     help=MODELS_OPTION_HELP)
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    overwrite: bool = setting(False, help="Replace an output (and parts) made with other settings.")
    keep_parts: bool = setting(False, cli=False, help="Keep <output>.parts/ after a successful run.")

    def result_fields(self) -> dict:
        """Every field marked as changing the result, by name."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if field_meta(f)["result"]}

    def result_hash(self) -> str:
        return result_hash(self.result_fields())

    def to_json(self) -> dict:
        """All settings plus the result hash, as written into an artifact's ``config_json``."""
        return {**dataclasses.asdict(self), "result_hash": self.result_hash()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
