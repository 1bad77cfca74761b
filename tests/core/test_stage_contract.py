"""The stage contract: result hash, parts store, atomic files, the generated CLI, the layering rules."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avatarcli.errors import AvatarError
from avatarcli.stage import PartsStore, StageConfig, atomic_path, option, remove_stale_temps, setting, unit_key
from tests.conftest import REPO


@dataclasses.dataclass
class ToyConfig(StageConfig):
    size: int = option(8, help="Side.")
    names: tuple[str, ...] = option(("a", "b"), parse=lambda s: tuple(s.split(",")), show=",".join)
    preview: str | None = setting(None, help="Preview folder.")


def test_result_hash_covers_options_not_settings():
    base = ToyConfig()
    assert set(base.result_fields()) == {"size", "names"}
    assert ToyConfig(preview="x", device="cuda", overwrite=True).result_hash() == base.result_hash()
    assert ToyConfig(size=9).result_hash() != base.result_hash()
    assert ToyConfig(names=("a",)).result_hash() != base.result_hash()
    assert base.to_json()["result_hash"] == base.result_hash()


def test_parts_store_stamp_resume_and_overwrite(tmp_path):
    output = tmp_path / "out.h5"
    with PartsStore(output, {"stage": "toy", "result_hash": "1"}) as store:
        with store.writing(unit_key("a")) as tmp:
            tmp.write_text("A")
        with pytest.raises(RuntimeError):
            with store.writing(unit_key("b")) as tmp:
                tmp.write_text("half")
                raise RuntimeError("crash mid-write")
        assert store.done(unit_key("a")) and not store.done(unit_key("b"))
        assert not list(store.folder.glob("*.tmp")) and not list(store.folder.glob(".*.tmp"))
        with pytest.raises(AvatarError, match="missing"):
            list(store.in_order([unit_key("a"), unit_key("b")]))
    with PartsStore(output, {"stage": "toy", "result_hash": "1"}) as store:  # same stamp: resumes
        assert store.finished([unit_key("a"), unit_key("b")]) == [unit_key("a")]
    with pytest.raises(AvatarError, match="other settings"):
        PartsStore(output, {"stage": "toy", "result_hash": "2"}).__enter__()
    with PartsStore(output, {"stage": "toy", "result_hash": "2"}, overwrite=True) as store:
        assert store.finished([unit_key("a")]) == []
        store.remove()
    assert not store.folder.exists()


def test_parts_store_refuses_a_second_run(tmp_path):
    output = tmp_path / "out.h5"
    code = textwrap.dedent(f"""
        import sys, time
        from avatarcli.stage import PartsStore
        with PartsStore({str(output)!r}, {{"stage": "toy"}}):
            print("locked", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AvatarError, match=f"another run \\(pid {holder.pid}\\)"):
            PartsStore(output, {"stage": "toy"}).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with PartsStore(output, {"stage": "toy"}):  # the lock died with its process
        pass


def test_atomic_path_honours_umask_and_stale_temps_go(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.txt.{int(dead.stdout)}-0000.tmp"
    live = tmp_path / f".a.txt.{os.getpid()}-0000.tmp"
    stale.write_text("debris")
    live.write_text("mine")
    assert remove_stale_temps(tmp_path, "a.txt") == [stale]
    assert live.exists() and not stale.exists()


def _stage_specs():
    from avatarcli.cli.stages import discover

    return discover()


def test_every_stage_is_registered():
    assert set(_stage_specs()) == {"preprocess", "fit-3dmm", "pretrain-expr", "eval", "import-deep3d", "synth",
                                   "train-recon", "render"}


def test_cli_defaults_are_the_config_defaults():
    """Every option of every generated stage command defaults to its config field's default."""
    import typer.main

    from avatarcli.cli.app import app
    from avatarcli.cli.stages import cli_fields
    from avatarcli.stage.config import field_meta, flag_of

    group = typer.main.get_command(app)
    for name, spec in _stage_specs().items():
        command = group.commands[name]
        by_flag = {opt: p for p in command.params for opt in p.opts}
        for item in cli_fields(spec.config, common=spec.common):
            param = by_flag[flag_of(item.field)]
            meta = field_meta(item.field)
            if item.field.name in ("device", "seed") and len(item.path) == 1:
                assert param.default is None  # the global option decides
                continue
            expected = meta["show"](item.default) if meta["show"] else item.default
            assert param.default == expected, (name, flag_of(item.field), param.default, expected)
            for alias in meta["aliases"]:
                assert alias in by_flag and by_flag[alias].hidden


def _python_files(*folders):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layering_rules():
    """No stage imports another stage; the library never imports stages; no module over 600 lines."""
    problems = []
    for path in _python_files("stages"):
        others = {n for n in _imports(path) if n.startswith("stages.") and n != f"stages.{path.stem}"}
        if others:
            problems.append(f"{path.relative_to(REPO)} imports {sorted(others)}")
    for path in _python_files("avatarcli"):
        if any(n == "stages" or n.startswith("stages.") for n in _imports(path)):
            problems.append(f"{path.relative_to(REPO)} imports stages")
    for path in _python_files("avatarcli", "stages"):
        lines = len(path.read_text().splitlines())
        if lines > 600:
            problems.append(f"{path.relative_to(REPO)} has {lines} lines")
    assert not problems, "\n".join(problems)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    """The module-level import graph of avatarcli and stages has no cycle."""
    modules = {_module_name(p): p for p in _python_files("avatarcli", "stages")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are deliberate
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_a_stage_run_removes_dead_runs_temp_files_and_honours_the_umask(assets, tmp_path):
    """Issue 16 items 7 and 10: temp files of killed runs are removed by the next run (beside the
    output and in its parts folder), and the artifact gets the umask's mode (mkstemp gave 0600)."""
    from stages.synth import SynthConfig, run

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    output = tmp_path / "synth.h5"
    stale_beside = tmp_path / f".synth.h5.{pid}-dead.tmp"
    stale_parts = tmp_path / "synth.h5.parts" / f".{unit_key('x')}.h5.{pid}-dead.tmp"
    stale_parts.parent.mkdir()
    stale_beside.write_bytes(b"debris" * 1000)
    stale_parts.write_bytes(b"debris")
    old = os.umask(0o022)
    try:
        config = SynthConfig(clips=1, frames=2, size=32, face_model=str(assets / "3dmm/ict_facekit/ict_face_light_f16.npz"),
                             device="cpu")
        run(config, output)
    finally:
        os.umask(old)
    assert output.stat().st_mode & 0o777 == 0o644
    assert not stale_beside.exists() and not stale_parts.exists()
    assert not list(tmp_path.glob(".*.tmp"))
