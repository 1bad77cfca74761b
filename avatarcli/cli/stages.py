"""Stage commands generated from the stage specs and configs (one source for every default).

Stages register through the ``avatarcli.stages`` entry point group (``pyproject.toml``), so the CLI
finds them without the library importing ``stages``. Each config field made with
``avatarcli.stage.option``/``setting`` becomes an option: its flag, help, hidden aliases and
choices come from the field's metadata and its default from the field. Fields whose type is a
dataclass (e.g. the training engine's settings) are flattened into the same command.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from functools import lru_cache
from typing import Annotated, Any, List, Optional

import typer

from avatarcli.cli.common import (STATE, StageProgress, emit_output, err, print_run_details, print_table, stdin_path,
                                  stdin_paths)
from avatarcli.errors import AvatarError
from avatarcli.stage.config import field_meta, flag_of

ENTRY_POINT_GROUP = "avatarcli.stages"
GLOBAL_DEFAULTS = {"device": "device", "seed": "seed"}
"""Fields whose CLI default is the global option of the same name (``avatar --device cuda fit-3dmm``)."""


@lru_cache(maxsize=1)
def discover() -> dict:
    """Every registered stage spec, by command name, in registration order."""
    from importlib.metadata import entry_points

    specs = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = entry.load()
        except AttributeError:  # a stage module without a STAGE spec yet (being ported)
            continue
        specs[spec.name] = spec
    return dict(sorted(specs.items(), key=lambda item: item[1].order))


@dataclasses.dataclass
class CliField:
    """One config field as a CLI option. ``path``: attribute path in the (nested) config."""

    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any
    default: Any

    @property
    def name(self) -> str:
        return "__".join(self.path)

    @property
    def meta(self) -> dict:
        return field_meta(self.field)


def cli_fields(config_cls: type, prefix: tuple[str, ...] = (), common: tuple[str, ...] | None = None) -> list[CliField]:
    """The config's fields shown on the command line (nested dataclasses flattened); of the common
    settings only those in ``common`` (default: all)."""
    from avatarcli.stage.config import StageConfig

    hints = typing.get_type_hints(config_cls)
    shared = {f.name for f in dataclasses.fields(StageConfig)}
    out: list[CliField] = []
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            out.extend(cli_fields(hint, prefix + (field.name,), common))
            continue
        if not field_meta(field)["cli"] or (common is not None and field.name in shared and field.name not in common):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        out.append(CliField(prefix + (field.name,), field, hint, default))
    return out


def _optional_inner(hint: Any) -> Any | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(hint):
            return args[0]
    return None


def _option_parameter(item: CliField) -> list[inspect.Parameter]:
    meta, hint, default = item.meta, item.hint, item.default
    flag = flag_of(item.field)
    names = [flag] + ([meta["short"]] if meta["short"] else [])
    help_text = meta["help"]
    if meta["choices"]:
        help_text += " \\[" + "|".join(meta["choices"]) + "]"  # escaped: help is rich markup
    shown_default = meta["show"](default) if meta["show"] else default
    if item.field.name in GLOBAL_DEFAULTS and not item.path[:-1]:
        value_type = _optional_inner(hint) or hint
        params = [inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[value_type], typer.Option(*names, help=help_text + " (default: the global option)",
                                               show_default=False)])]
    elif hint is bool:
        value_type = bool
        spelled = [f"{flag}/--no-{flag[2:]}"] if default else names
        params = [inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                    annotation=Annotated[bool, typer.Option(*spelled, help=help_text)])]
    else:
        inner = _optional_inner(hint)
        if meta["parse"] is not None:
            value_type = str
        elif inner is not None or hint in (int, float, str):
            value_type = inner or hint
        else:
            raise TypeError(f"{item.name}: give the option a parse/show pair for type {hint!r}")
        annotation = Optional[value_type] if inner is not None else value_type
        params = [inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=shown_default,
                                    annotation=Annotated[annotation, typer.Option(*names, help=help_text,
                                                                                  show_default=default is not None)])]
    for alias in meta["aliases"]:  # older spellings: accepted, not shown; same type as the option
        annotation = Optional[value_type]
        params.append(inspect.Parameter(f"{item.name}__alias_{alias.strip('-').replace('-', '_')}",
                                        inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[annotation, typer.Option(alias, hidden=True)]))
    return params


def _input_parameter(spec_input) -> inspect.Parameter:
    kind = List[str] if spec_input.many else str
    if spec_input.flag is None:
        info = typer.Argument(help=spec_input.help, show_default=False)
    else:
        names = [spec_input.flag] + ([spec_input.short] if spec_input.short else [])
        info = typer.Option(*names, help=spec_input.help, show_default=False)
    if spec_input.required:
        return inspect.Parameter(spec_input.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, info])
    return inspect.Parameter(spec_input.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


def _value(item: CliField, given: dict) -> Any:
    value = given.pop(item.name)
    for key in [k for k in given if k.startswith(item.name + "__alias_")]:
        alias = given.pop(key)
        if alias is not None:
            value = alias
    if item.field.name in GLOBAL_DEFAULTS and not item.path[:-1] and value is None:
        value = getattr(STATE, GLOBAL_DEFAULTS[item.field.name])
    if item.meta["parse"] is not None and isinstance(value, str):
        value = item.meta["parse"](value)
    if item.meta["choices"] and value not in item.meta["choices"]:
        raise typer.BadParameter(f"must be one of {', '.join(item.meta['choices'])}, not {value!r}",
                                 param_hint=flag_of(item.field))
    return value


def build_config(config_cls: type, items: list[CliField], given: dict, prefix: tuple[str, ...] = ()):
    """The config from the parsed CLI values (nested dataclasses built from their own fields)."""
    kwargs = {}
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        path = prefix + (field.name,)
        if dataclasses.is_dataclass(hints[field.name]):
            kwargs[field.name] = build_config(hints[field.name], items, given, path)
            continue
        item = next((i for i in items if i.path == path), None)
        if item is not None:
            kwargs[field.name] = _value(item, given)
    return config_cls(**kwargs)


def make_command(spec):
    """A typer command function for ``spec`` (signature built from its inputs and config)."""
    items = cli_fields(spec.config, common=spec.common)
    params = [_input_parameter(i) for i in spec.inputs if i.flag is None]
    output_default = spec.output_default
    params.append(inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY,
                                    **({} if output_default is None else {"default": output_default}),
                                    annotation=Annotated[str, typer.Option("--output", "-o",
                                                                           help="Output artifact path (.h5).")]))
    params += [_input_parameter(i) for i in spec.inputs if i.flag is not None]
    for item in items:
        params += _option_parameter(item)

    def command(**given: Any) -> None:
        config = build_config(spec.config, items, dict(given))
        inputs = {}
        for spec_input in spec.inputs:
            value = given[spec_input.name]
            if spec_input.stdin and value is not None:
                value = stdin_paths(value) if spec_input.many else stdin_path(value)
            inputs[spec_input.name] = value
        progress = spec.progress(spec) if spec.progress is not None else StageProgress(spec.name, unit=f"{spec.unit}s")
        with progress:
            summary = spec.run(config, output=given["output"], progress=progress, **inputs)
        if summary is None:  # a non-main DDP rank: rank 0 reports
            return
        print_summary(summary)
        printed = spec.report(summary, config) if spec.report is not None else False
        if not summary.produced or summary.details.get("error"):
            failure = AvatarError(summary.details.get("error") or f"{spec.name} produced nothing; "
                                  f"the skips are listed above")
            failure.exit_code = 1  # the run finished but failed its goal (usage errors exit 2)
            raise failure
        if not printed:
            emit_output(summary.output)

    command.__signature__ = inspect.Signature(params)
    command.__name__ = spec.name.replace("-", "_")
    return command


def print_summary(summary) -> None:
    """The one summary table of every stage (one row, or one row per figure where that would not fit
    the console), then step times (-v), skips and warnings."""
    from rich.markup import escape

    columns = {f"{summary.unit}s": summary.units, "done now": summary.units_now, "kept from before": summary.reused,
               "frames": summary.frames, "skipped": len(summary.skipped), **summary.columns,
               "frames/s": f"{summary.frames_per_second:.1f}"}
    print_table(summary.stage, columns)
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    print_run_details(summary.timings, summary.skipped, summary.unit)


def register(app: typer.Typer) -> None:
    """Add every registered stage's command to ``app``."""
    specs = discover()
    if not specs:  # running from a source tree that was never installed: say so instead of "No such command"
        err.print("[yellow]warning:[/] no stages are registered (entry points 'avatarcli.stages'); install the "
                  "package, e.g. `pip install -e .` in the repository", soft_wrap=True)
    for spec in specs.values():
        app.command(spec.name, help=spec.help, short_help=spec.summary, epilog=spec.epilog or None)(make_command(spec))
