"""Stage ``preprocess``: raw videos -> clips artifact (fixed fps, nose-centred square face crops).

check (settings, expand the inputs) -> prepare (existing output and finished parts, face models)
-> compute (per source, ``avatarcli.preprocess.source.process_source``: decode, detect, track,
landmarks, crop; each result written to its part file) -> write (the artifact's tables; its clips
were copied in source order while the sources ran, by :class:`avatarcli.clips.ClipsAssembler`).

Each source is a unit: its part is ``<output>.parts/<unit_key(path)>.h5`` (written atomically), so
a crash loses at most the sources in flight and a rerun with the same settings resumes. Sources
already in an existing output made with the same settings are kept as they are, so a rerun with
more inputs processes only the new ones.

CPU: one process, or ``--workers N`` processes each handling whole sources. CUDA: decode threads
upload whole sources ahead, ``--gpu-streams`` model threads (persistent, one CUDA stream each) run
the networks, two writer threads compress the parts.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

from avatarcli.clips import ClipsAssembler
from avatarcli.errors import AvatarError
from avatarcli.identity import check_identity_rule
from avatarcli.preprocess.parts import UnitRecord, read_part, source_unchanged, units_from_output, write_part
from avatarcli.preprocess.source import Stopped, prefetch, process_source
from avatarcli.runtime import exit_with_parent
from avatarcli.schemas import CLIPS
from avatarcli.stage import (
    InputSpec, PartsStore, Stage, StageConfig, StageSpec, Summary, existing_output_matches, option, setting, unit_key,
)
from avatarcli.video import VIDEO_EXTENSIONS

READS: tuple[str, ...] = ()
WRITES = CLIPS.kind
PART_VERSION = 2  # 2: parts in a PartsStore (stamp.json), keyed by unit_key(path)


@dataclass
class PreprocessConfig(StageConfig):
    """Settings of ``avatar preprocess``: options change the output (and are checked on resume),
    settings only change speed or reporting."""

    fps: float = option(25.0, help="Output frame rate; frames are picked by presentation timestamp.")
    crop_size: int = option(256, help="Side of the square crops, pixels.")
    crop_scale: float = option(2.0, help="Crop side = scale * max(2*eye dist, 1.8*eye-mouth) (FFHQ at 2.0).")
    identity_from: str = option("parent", help="Identity per clip: parent (folder name), stem (file name) or "
                                "regex:PATTERN (first group, else the whole match, searched in the full path).")
    detector: str = option("scrfd_2.5g", help="Face detector (registry name).")
    landmarker: str = option("pfld68", flag="--landmark-model", aliases=("--landmarker",),
                             help="68-point landmark model (registry name).")
    det_size: int = option(0, help="Detector input side, multiple of 32; the padded frame is letterboxed into it "
                           "(0 = auto: 640 CUDA, 320 CPU, where faces must be at least ~1/12 of the long side).")
    det_pad: float = option(0.25, help="Border added on every side before detection, as a fraction of the long "
                            "side, so faces that fill the frame are found.")
    det_threshold: float = option(0.5, help="Minimum detector score.")
    det_every: int = option(0, help="Detect on every Nth frame, boxes in between interpolated and refined by the "
                            "landmark model (0 = auto: 1 on CUDA, 3 on CPU).")
    lmk_every: int = option(0, help="Landmarks on every Nth frame of a clip (and its last), the rest interpolated "
                            "(0 = auto: 1 on CUDA, 2 on CPU).")
    max_gap: int = option(12, help="Longest detection gap (frames) that is interpolated; longer gaps split the clip.")
    min_frames: int = option(25, help="Drop clips shorter than this (after splitting).")
    center_sigma: float = option(1.0, help="Temporal smoothing (Gaussian sigma, frames) of the crop centre.")
    scale_sigma: float = option(5.0, help="Temporal smoothing (Gaussian sigma, frames) of the crop size.")
    compression_level: int = option(1, help="Deflate level of the frames (0 = none).")
    # Without effect on the output. Batches: 0 = as many frames as fit in 128 MiB (on an H100, 32-frame
    # batches at 512² ran at 394 frames/s and 128-frame ones at 605). Streams: with 128-frame batches one is
    # as fast or faster (H100, 16 × 200 frames at 512²: 1 stream 606-630 frames/s, 2 streams 525-544: the
    # threads compete for the GIL).
    batch_frames: int = setting(0, help="Frames per decode/model batch; 0 = by frame size (128 at 512²).")
    frame_cache_mb: int = setting(2048, help="Keep a source's decoded frames in memory up to this size (MiB); "
                                  "longer sources are decoded again for each pass.")
    workers: int = setting(0, help="CPU: processes, each handling whole sources; CUDA: decode threads "
                           "(0 = auto: half the cores, 2 to 8).")
    gpu_streams: int = setting(1, help="CUDA: sources processed concurrently, one thread and stream each.")
    shard: str = setting("", help="Process only shard K/N of the inputs: K, K+N, ... (merge with avatar merge).")
    strict: bool = setting(False, help="Exit nonzero when any input is skipped.")


# ------------------------------------------------------------------------------------------------
# check


def expand_inputs(inputs: list[str]) -> list[str]:
    """Video files, folders (recursive, video extensions only) and text files listing paths,
    in the given order, folders sorted, duplicates dropped. Paths are made absolute."""
    result: list[str] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = str(path.absolute())
        if key not in seen:
            seen.add(key)
            result.append(key)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in VIDEO_EXTENSIONS:
                    add(child)
        elif path.suffix.lower() in {".txt", ".lst", ".list"} and path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line) if Path(line).is_absolute() else path.parent / line
                    add(entry)
        elif path.exists():
            add(path)
        else:
            raise AvatarError(f"input not found: {item}")
    return result


def refuse_output_among_inputs(output: Path, sources: list[str]) -> None:
    """An output that is one of the input videos is an error, with or without --overwrite: the
    run would replace the video it reads."""
    target = output.resolve()
    for source in sources:
        same = Path(source).resolve() == target
        if not same and output.exists():
            try:
                same = os.path.samefile(source, output)  # hard links, bind mounts
            except OSError:
                same = False
        if same:
            raise AvatarError(f"the output {output} is one of the inputs; choose another output "
                              "(an input is never overwritten, not even with --overwrite)")


def parse_shard(shard: str) -> tuple[int, int]:
    if not shard:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise AvatarError(f"--shard must be K/N with 0 <= K < N, not {shard!r}")
    return int(match.group(1)), int(match.group(2))


def load_faces(config: PreprocessConfig, device: str):
    """The detector and landmark model of ``config`` on ``device`` (fp16 on CUDA)."""
    from avatarcli.face.analysis import FaceAnalysis

    return FaceAnalysis.load(config.detector, config.landmarker, config.models_dir, device,
                             det_size=config.det_size, det_pad=config.det_pad, det_threshold=config.det_threshold,
                             half=device.startswith("cuda"))


# ------------------------------------------------------------------------------------------------
# CPU worker processes (--workers N on the CPU): each handles whole sources and writes their parts

_WORKER: dict = {}
def _worker_init(config: PreprocessConfig, output: str, stamp: dict, threads: int, parent: int) -> None:
    exit_with_parent(parent)
    import torch

    from avatarcli.artifact import FrameWriter

    torch.set_num_threads(threads)
    _WORKER["config"] = config
    _WORKER["store"] = PartsStore(output, stamp, suffix=".h5")  # the parent holds its lock
    _WORKER["faces"] = load_faces(config, "cpu")
    _WORKER["writer"] = FrameWriter(config.compression_level, threads=threads)


def _worker_run(path: str) -> UnitRecord:
    config = _WORKER["config"]
    result = process_source(path, config, _WORKER["faces"])
    return write_part(_WORKER["store"], result, config, _WORKER["writer"])


# ------------------------------------------------------------------------------------------------
# the stage


class Preprocess(Stage):
    """Every source video among the inputs is a unit; its clips are copied into the artifact in
    source order as soon as the sources before it are done."""

    name, unit = "preprocess", "input"
    cuda_events = True  # GPU steps timed with events on the thread's stream: no host waits

    def __init__(self, config: PreprocessConfig, inputs: list[str], output, progress=None):
        super().__init__(config, Path(output), progress)
        self.inputs = inputs
        self.faces = None

    def check(self) -> None:
        config = self.config
        if config.det_size < 0 or config.det_size % 32:
            raise AvatarError("--det-size must be 0 (auto) or a multiple of 32")
        check_identity_rule(config.identity_from)
        shard_index, shard_count = parse_shard(config.shard)
        if config.fps <= 0 or config.crop_size < 16 or config.crop_scale <= 0:
            raise AvatarError("--fps must be > 0, --crop-size >= 16 and --crop-scale > 0")
        if config.batch_frames < 0:
            raise AvatarError("--batch-frames must be >= 0 (0 = by frame size)")
        sources = expand_inputs(self.inputs)
        refuse_output_among_inputs(self.output, sources)
        self.sources = [p for i, p in enumerate(sources) if i % shard_count == shard_index]
        if not self.sources:
            raise AvatarError("no video inputs found" + (f" in shard {config.shard}" if config.shard else ""))

    def prepare(self, ctx) -> None:
        """Finished units: from an existing output made with the same settings, then from the parts
        of an interrupted run; the face models when there is work left."""
        config, output = self.config, self.output
        self.device = ctx.device_name
        source_set = set(self.sources)
        self.units: dict[str, UnitRecord] = {}
        reusable = existing_output_matches(output, CLIPS.kind, config.result_hash(), config.overwrite)
        # a finished unit counts only while its source has the content it was made from
        if reusable:
            self.units = {p: u for p, u in units_from_output(output).items()
                          if p in source_set and source_unchanged(u)}
        if len(self.units) < len(self.sources):  # every missing model in one error, before the parts folder
            from avatarcli import registry

            registry.resolve_all([config.detector, config.landmarker], config.models_dir)
        self.stamp = {"stage": self.name, "part_version": PART_VERSION, "result_hash": config.result_hash()}
        self.store = self.hold(PartsStore(output, self.stamp, suffix=".h5", overwrite=config.overwrite))
        for path in self.sources:
            if path not in self.units and self.store.done(unit_key(path)):
                record = read_part(self.store.path(unit_key(path)))
                if record is not None and record.path == path and source_unchanged(record):
                    self.units[path] = record
        self.todo = [p for p in self.sources if p not in self.units]
        self.reused = len(self.sources) - len(self.todo)
        self.in_processes = not ctx.cuda and config.workers > 1
        if self.todo and not self.in_processes:  # the workers load their own (resolved above)
            with ctx.timer.step("load_models", sync=False):
                self.faces = load_faces(config, self.device)

    def compute(self, ctx) -> None:
        ctx.progress.start(total_units=len(self.sources), done_units=self.reused)
        self.frames_now = 0
        self.lock = threading.Lock()
        # held: a failed run leaves no artifact, only the parts
        self.assembler = self.hold(ClipsAssembler(self.output, self.sources, self.config))
        for unit in self.units.values():  # finished before: copied while the rest runs
            self.assembler.offer(unit)
        if not self.todo:
            return
        if self.in_processes:
            self._compute_in_processes(ctx)
        else:
            self._compute_in_threads(ctx)

    def _finished(self, ctx, record: UnitRecord) -> None:
        with self.lock:
            self.units[record.path] = record
            self.frames_now += record.frames
            ctx.progress.unit_done(Path(record.path).name, record.status, record.reason)
        self.assembler.offer(record)

    def _compute_in_processes(self, ctx) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        config = self.config
        threads = max(1, (os.cpu_count() or 1) // config.workers)
        pool = ProcessPoolExecutor(config.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(config, str(self.output), self.stamp, threads, os.getpid()))
        try:
            futures = [pool.submit(_worker_run, p) for p in self.todo]
            for future in as_completed(futures):
                record = future.result()
                ctx.progress.advance_frames(record.frames)
                self._finished(ctx, record)
        except BaseException:
            # Ctrl-C or a failure: the sources in flight are abandoned (their parts are written
            # atomically, so nothing half-done remains); waiting for them took seconds per source
            workers = list((pool._processes or {}).values())  # noqa: SLF001 - the executor offers no kill
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.join(5)
            raise
        pool.shutdown()

    def _compute_in_threads(self, ctx) -> None:
        """This process: decode threads read sources ahead (on CUDA they upload them too), model
        threads run the networks, writer threads compress the parts."""
        from concurrent.futures import ThreadPoolExecutor

        from avatarcli.artifact import FrameWriter
        from avatarcli.runtime import thread_stream, worker_threads

        config, device, timer, todo = self.config, self.device, ctx.timer, self.todo
        frame_writer = FrameWriter(config.compression_level)
        decode_threads = 1
        if ctx.cuda:  # 0 = auto: half the cores decode (decord releases the GIL)
            decode_threads = config.workers or max(2, min(8, (os.cpu_count() or 2) // 2))
        # A bounded window of sources decoding ahead; writes happen in background threads.
        write_queue: queue.Queue = queue.Queue(maxsize=2)
        errors: list[BaseException] = []
        stop = threading.Event()  # set when the run ends early (Ctrl-C, a failure): work in flight stops

        def writer_loop() -> None:
            while (item := write_queue.get()) is not None:
                if stop.is_set():
                    continue  # drained, not written: the run is ending
                try:
                    frames = sum(len(c.frames) for c in item.clips)
                    with timer.step("write", frames, sync=False):
                        record = write_part(self.store, item, config, frame_writer)
                    self._finished(ctx, record)
                except BaseException as exc:  # surfaced in the main thread below
                    errors.append(exc)

        def process(path: str, fetched) -> None:
            if ctx.cuda:
                import torch

                with torch.cuda.stream(thread_stream(device)):
                    result = process_source(path, config, self.faces, ctx.progress.advance_frames, fetched, timer,
                                            stop.is_set)
            else:
                result = process_source(path, config, self.faces, ctx.progress.advance_frames, fetched, timer,
                                        stop.is_set)
            write_queue.put(result)

        # Two writers: one can write chunks while the other waits on its compression threads.
        writers = [threading.Thread(target=writer_loop, daemon=True) for _ in range(2 if ctx.cuda else 1)]
        # GPU threads give up the GIL at every sync; with decode and write threads busy they
        # would wait a whole switch interval (5 ms) to get it back.
        switch_interval = sys.getswitchinterval()
        if ctx.cuda:
            sys.setswitchinterval(0.0005)
        for writer in writers:
            writer.start()
        streams = max(1, config.gpu_streams) if ctx.cuda else 1
        decoders = ThreadPoolExecutor(decode_threads)
        running: list = []
        try:
            model_pool = worker_threads(device, streams)
            window = decode_threads + streams
            pending = [decoders.submit(prefetch, p, config, timer, device, stop.is_set) for p in todo[:window]]
            for i, path in enumerate(todo):
                if errors:
                    raise errors[0]
                fetched = pending[i].result()
                pending[i] = None  # the processing task holds the frames from here
                if i + window < len(todo):
                    pending.append(decoders.submit(prefetch, todo[i + window], config, timer, device, stop.is_set))
                running.append(model_pool.submit(process, path, fetched))
                del fetched
                while len(running) >= streams:  # bounded: at most `streams` sources in flight
                    done = next(as_completed(running))
                    running.remove(done)
                    done.result()
            for task in running:
                task.result()
        except BaseException:
            # Ctrl-C or a failure: queued sources are dropped and those in flight stop at their next
            # batch (waiting for them to finish took 7-14 s)
            stop.set()
            for task in running:
                task.cancel()
            raise
        finally:
            decoders.shutdown(wait=True, cancel_futures=True)
            for task in running:  # each ends within a batch once stopped; its Stopped is not an error
                try:
                    task.exception()
                except BaseException:  # noqa: BLE001 - a cancelled task
                    pass
            for writer in writers:
                while writer.is_alive():  # a writer may be busy: never block on a full queue
                    try:
                        write_queue.put(None, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            for writer in writers:
                writer.join()
            frame_writer.close()
            sys.setswitchinterval(switch_interval)
        if errors:
            raise errors[0]

    def write(self, ctx) -> Summary:
        config, sources, units = self.config, self.sources, self.units
        missing = [p for p in sources if p not in units]
        if missing:
            raise AvatarError(f"{len(missing)} input(s) were not finished (first: {missing[0]}); rerun to resume")
        start = time.perf_counter()
        counts = self.assembler.finish(units)
        self.assembler.close()  # tables written: validated and renamed into place
        ctx.timer.add("assemble", time.perf_counter() - start, len(sources))
        if not config.keep_parts:
            self.store.remove()
        skipped = [(p, units[p].reason) for p in sources if units[p].status != "ok"]
        error = None
        if counts["clips"] == 0:
            error = (f"no clips were produced ({len(skipped)} input(s) skipped); the skips are recorded in "
                     f"{self.output}")
        elif config.strict and skipped:
            error = f"--strict: {len(skipped)} input(s) skipped"
        return Summary(self.name, self.output, self.unit, len(sources), counts["frames"], units_now=len(self.todo),
                       reused=self.reused, frames_now=self.frames_now, seconds=ctx.elapsed(), skipped=skipped,
                       timings=ctx.timer.as_dict(), device=ctx.device_name,
                       columns={"clips": counts["clips"], "identities": counts["identities"]},
                       details={"error": error} if error else {}, produced=counts["clips"] > 0)


def run(config: PreprocessConfig, inputs: list[str], output: str | Path, progress=None) -> Summary:
    """Preprocess ``inputs`` (videos, folders, .txt lists) into the clips artifact ``output``.

    ``progress``: an ``avatarcli.stage.Progress`` (e.g. ``avatarcli.cli.common.StageProgress``).
    ``Summary.columns`` holds the clips and identities of the output; ``details["error"]`` is set
    when nothing usable was produced or, with ``strict``, when an input was skipped.
    """
    return Preprocess(config, inputs, output, progress).run()


STAGE = StageSpec(
    name="preprocess",
    summary="Videos -> 25 fps, nose-centred 256² face crops with landmarks.  e.g. avatar preprocess videos/ -o clips.h5",
    help=("Decode videos (files, folders, or text files listing paths; '-' reads paths from stdin), resample to a "
          "fixed fps by timestamp, detect and track the main face, and write nose-centred square crops with 5- and "
          "68-point landmarks to a clips artifact. Bad inputs are recorded as skipped with a reason. Rerunning the "
          "same command resumes an interrupted run and adds new inputs to an existing output."),
    epilog="Example: avatar preprocess videos/ -o clips.h5 | avatar info -",
    config=PreprocessConfig,
    run=run,
    inputs=(InputSpec("inputs", "Videos, folders, .txt lists of paths, or '-' (stdin).", many=True, stdin=True),),
    unit="input",
    common=("models_dir", "device", "overwrite"),
    order=10,
)
