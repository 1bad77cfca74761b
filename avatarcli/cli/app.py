"""``avatar``: the Typer app. Stage commands are generated from the registered stages
(``avatarcli.cli.stages``); the other commands have a module each. Torch is imported lazily."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Optional

import typer
from rich.markup import escape

from avatarcli import __version__, registry
from avatarcli.cli import info, merge, models
from avatarcli.cli.common import STATE, err
from avatarcli.cli.stages import register as register_stages
from avatarcli.errors import AvatarError

app = typer.Typer(
    name="avatar",
    help="Build and evaluate 3D face avatars, one stage at a time. Stages read and write HDF5 "
    "artifacts, print their output path on stdout and accept '-' to read their input path from stdin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

register_stages(app)
# Commands that are not stages (tools on artifacts and models): one module per command.
for module in (info, merge, models):
    app.command(module.NAME, help=module.HELP, short_help=module.SUMMARY, epilog=module.EPILOG)(module.command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"avatar {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr (repeatable).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or progress lines on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed for stages that sample.")] = 0,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    STATE.verbose, STATE.quiet, STATE.debug, STATE.device, STATE.seed = verbose, quiet, debug, device, seed


def one_line(text: str) -> str:
    """``text`` on one line, markup escaped: messages of other libraries span lines (HDF5 puts a
    ``ctime()`` with its newline into a write error) and may hold brackets (paths)."""
    return escape(" ".join(text.split()))


def _interrupt_of(exc: BaseException) -> Optional[KeyboardInterrupt]:
    """The Ctrl-C behind ``exc``: typer turns a KeyboardInterrupt into ``Exit(130)`` (a SystemExit
    raised while handling it), so the interrupt is found down the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    err.print("[bold red]interrupted[/]; rerun the same command to resume")
    sys.exit(130)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    registry.absolutize_models_env()  # relative entries mean the start directory, in workers too
    try:
        app()
    except AvatarError as exc:
        if debug or STATE.debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {one_line(str(exc))}", soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt as exc:
        _interrupted(exc, debug or STATE.debug)
    except SystemExit as exc:
        interrupt = _interrupt_of(exc) if exc.code == 130 else None
        if interrupt is None:
            raise
        _interrupted(interrupt, debug or STATE.debug)
    except Exception as exc:  # anything unexpected still gets one line unless --debug
        if debug or STATE.debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc.__class__.__name__}: {one_line(str(exc))} "
                  "(rerun with --debug for the traceback)", soft_wrap=True)
        sys.exit(1)
