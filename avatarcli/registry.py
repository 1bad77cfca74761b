"""Model registry: models are resolved by name, verified by sha256, downloaded on first use.

Search order for a model's file: ``--models DIR``, then each folder of ``$AVATAR_MODELS`` (a list
separated by ``os.pathsep``, ``:`` on Linux and macOS: ``AVATAR_MODELS=/data/models:~/more``), then
the user cache (``$XDG_CACHE_HOME/avatar/models``, default ``~/.cache/avatar/models``). Relative
entries are relative to the working directory the command started in: the CLI makes
``$AVATAR_MODELS`` absolute once at startup (:func:`absolutize_models_env`), so the processes it
starts see the same folders. A folder in the list that does not exist is reported once (a warning
line on stderr) and skipped.

In each folder the file may sit at ``<dir>/<subdir>/<file>`` (the layout downloads use, e.g.
``<dir>/3dmm/ict_facekit/ict_face_light_f16.npz``), at ``<dir>/<tail of subdir>/<file>`` (a folder
given at a deeper level: ``<dir>/ict_facekit/<file>`` or ``<dir>/<file>``). Folders on the way may
be symbolic links, or the small text files git writes for a symbolic link where links are not
checked out as links (the file holds the relative target, e.g. ``3dmm`` holding ``../3dmm``).

Downloads go to the cache; its folders are created only when a download has arrived, so a failed
download (offline) leaves nothing behind.

Some entries are *built* from their download rather than being the download (``ModelSpec.build``:
the ICT face model is compacted from the official repository archive on first use). A built file
holds the same arrays as the pinned reference build but not the same bytes (npz zip timestamps), so
such entries also carry a ``content`` fingerprint: a local copy passes when its sha256 equals the
pinned one (an exact copy of the reference build) or, failing that, when its arrays match the
fingerprint (same names and shapes, identical integer/string arrays, float sums within 1e-5 of
the sum of absolute values: this tolerates f16 rounding differences of a rebuild, not edits).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from avatarcli.errors import AvatarError, ModelNotFoundError
from avatarcli.provenance import sha256_file


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model and how to feed it."""

    name: str
    """Registry name used on the command line (``--detector scrfd_2.5g``)."""
    filename: str
    subdir: str
    """Folder below a models directory where downloads are placed."""
    sha256: str | None
    """Pinned content hash; ``None`` where no copy was available to pin (verified by size only)."""
    url: str
    """Direct download address (a file, or a zip holding ``archive_member``)."""
    source: str
    """The official origin of the weights."""
    license: str
    task: str
    input: str
    """Input conventions: shape, channel order, normalisation, crop."""
    archive_member: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    build: str | None = None
    """``"module:function"`` turning the downloaded payload into ``filename``: called as
    ``function(downloaded_path, out_path)``. None: the download (or its archive member) is the file."""
    content: dict | None = None
    """npz content fingerprint (:func:`npz_fingerprint`) accepted when the sha256 differs."""


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="scrfd_10g",
            filename="det_10g.onnx",
            subdir="face_detection",
            sha256=None,
            url="https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
            archive_member="det_10g.onnx",
            source="deepinsight/insightface model zoo (buffalo_l, SCRFD-10GF with 5 keypoints)",
            license="insightface models: non-commercial research only",
            task="face detection + 5 keypoints",
            input="[B,3,H,W] RGB, (x-127.5)/128, H and W multiples of 32; strides 8/16/32, 2 anchors",
        ),
        ModelSpec(
            name="scrfd_2.5g",
            filename="scrfd_2.5g_bnkps.onnx",
            subdir="face_detection",
            sha256="bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce",
            url="https://raw.githubusercontent.com/darzhz/pixamatch/7cc795413024/models/scrfd_2.5g_bnkps.onnx",
            source="deepinsight/insightface SCRFD-2.5GF official export (buffalo_m det_2.5g)",
            license="insightface models: non-commercial research only",
            task="face detection + 5 keypoints",
            input="[B,3,H,W] RGB, (x-127.5)/128, H and W multiples of 32; strides 8/16/32, 2 anchors",
        ),
        ModelSpec(
            name="scrfd_500m",
            filename="scrfd_500m_kps_640.onnx",
            subdir="face_detection",
            sha256="517cb1980c72422e676738fc45431700fb7cbee56d0f825b623ee427b3e5ce58",
            url="https://raw.githubusercontent.com/hpc203/scrfd-opencv/eee7bf1ee0db/weights/scrfd_500m_kps.onnx",
            source="deepinsight/insightface SCRFD-500MF (buffalo_s det_500m), fixed 640 re-export",
            license="insightface models: non-commercial research only",
            task="face detection + 5 keypoints",
            input="[1,3,640,640] RGB, (x-127.5)/128",
        ),
        ModelSpec(
            name="arcface_r50",
            filename="w600k_r50.onnx",
            subdir="face_recognition",
            sha256=None,
            url="https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
            archive_member="w600k_r50.onnx",
            source="deepinsight/insightface model zoo (buffalo_l, ArcFace R50 on WebFace600K)",
            license="insightface models: non-commercial research only",
            task="face recognition embedding (512-d)",
            input="[B,3,112,112] RGB, (x-127.5)/127.5, ArcFace 5-point similarity alignment",
            extra={"pixel_mean": (127.5, 127.5, 127.5), "pixel_std": (127.5, 127.5, 127.5)},
        ),
        ModelSpec(
            name="mobilefacenet_arcface",
            filename="mobilefacenet_arcface_foamliu.onnx",
            subdir="face_recognition",
            sha256="b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507",
            url="https://raw.githubusercontent.com/foamliu/MobileFaceNet/a6cc9032a659/weights/MobileFaceNet.onnx",
            source="foamliu/MobileFaceNet (ArcFace loss, refined MS1M)",
            license="Apache-2.0 (code); MS1M-trained weights: research use",
            task="face recognition embedding (128-d); CSIM stand-in, not comparable to published CSIM",
            input="[1,3,112,112] RGB, /255 then ImageNet mean/std, ArcFace 5-point alignment",
            extra={"pixel_mean": (123.675, 116.28, 103.53), "pixel_std": (58.395, 57.12, 57.375)},
        ),
        ModelSpec(
            name="pfld68",
            filename="pfld_68.onnx",
            subdir="landmarks68",
            sha256="7d7bbd5c6a1d9272e58d9773898284a1905d872eba9a662df9b5f20f1ba6f83e",
            url="https://raw.githubusercontent.com/cunjian/pytorch_face_landmark/6f34bf9f034a/onnx/pfld.onnx",
            source="cunjian/pytorch_face_landmark PFLD (300W + external data)",
            license="research use (no license file upstream)",
            task="68-point landmarks (iBUG order)",
            input="[B,3,112,112] RGB in [0,1]; square crop of side 1.1*max(w,h) of the detector box",
        ),
        ModelSpec(
            name="ict_facekit",
            filename="ict_face_light_f16.npz",
            subdir="3dmm/ict_facekit",
            sha256="8121d90a42d7eff0cae06058d301f938ef23641dad514665f49f6790e94ce43a",
            url="https://github.com/ICT-VGL/ICT-FaceKit/archive/da5f95a607f5e6b37755b38d3385d7f2853732e5.zip",
            build="avatarcli.facemodel.ict:build_ict_compact",
            source="ICT-VGL/ICT-FaceKit @ da5f95a607f5 (ICT Face Model Light, FaceXModel/), compacted",
            license="MIT",
            task="linear 3D face model: 100 identity PCA modes + 53 ARKit-style expression blendshapes",
            input="npz: v_neutral (11248,3) cm, y up, +z towards the camera; id_deltas (100,V,3) f16 ~N(0,1); "
            "exp_deltas (53,V,3) f16, weights 0..1; faces (22288,3); lmk68_vertex_idx (iBUG order). "
            "avatarcli.facemodel.load_face_model('ict') loads it in mm",
            notes="built on first use from the official repository archive (OBJs -> compact npz)",
            extra={"kind": "face_model"},
            content={
                "exp_deltas": {"shape": [53, 11248, 3], "sum": 10362.978264, "abs_sum": 55125.083836},
                "exp_names": {"shape": [53], "sha256": "a3b7c36cb0fd2e60"},
                "faces": {"shape": [22288, 3], "sha256": "4aa10cad9a5de68a"},
                "fitting_vertex_idx": {"shape": [7801], "sha256": "133f547e3e888a96"},
                "full_face_num_vertices": {"shape": [], "sha256": "268b23c66f71facd"},
                "id_deltas": {"shape": [100, 11248, 3], "sum": 5821.487767, "abs_sum": 53905.172269},
                "lmk68_vertex_idx": {"shape": [68], "sha256": "56af14add570e488"},
                "narrow_face_num_vertices": {"shape": [], "sha256": "b3c3d32983225429"},
                "rigid_vertex_idx": {"shape": [910], "sha256": "622207cfcb0d5c74"},
                "units": {"shape": [], "sha256": "b5039c325d7107d6"},
                "v_neutral": {"shape": [11248, 3], "sum": 66833.065869, "abs_sum": 173605.908843},
            },
        ),
        ModelSpec(
            name="lpips_alex_lin",
            filename="alex.pth",
            subdir="lpips",
            sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
            url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/v0.1/lpips/weights/v0.1/alex.pth",
            source="richzhang/PerceptualSimilarity LPIPS v0.1 linear layers (AlexNet)",
            license="BSD-2-Clause",
            task="LPIPS linear calibration of AlexNet features (used with alexnet_imagenet)",
            input="5 feature maps of AlexNet, unit-normalised over channels",
        ),
        ModelSpec(
            name="alexnet_imagenet",
            filename="alexnet-owt-7be5be79.pth",
            subdir="lpips",
            sha256=None,
            url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            source="torchvision AlexNet ImageNet weights (the backbone LPIPS uses)",
            license="BSD-3-Clause (torchvision)",
            task="LPIPS backbone",
            input="[B,3,H,W] RGB scaled to [-1,1], then LPIPS's shift/scale layer",
        ),
        ModelSpec(
            name="lpips_vgg_lin",
            filename="vgg.pth",
            subdir="lpips",
            sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
            url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/v0.1/lpips/weights/v0.1/vgg.pth",
            source="richzhang/PerceptualSimilarity LPIPS v0.1 linear layers (VGG16)",
            license="BSD-2-Clause",
            task="LPIPS linear calibration of VGG16 features (used with vgg16_imagenet)",
            input="5 feature maps of VGG16, unit-normalised over channels",
            notes="sha256 of the copy shipped in the lpips 0.1.4 wheel (whose alex.pth matches lpips_alex_lin's pin)",
        ),
        ModelSpec(
            name="vgg16_imagenet",
            filename="vgg16-397923af.pth",
            subdir="lpips",
            # Not pinned: no copy was available to hash. torchvision names its files
            # <arch>-<first 8 hex digits of the sha256>, so a good copy's digest starts with 397923af.
            sha256=None,
            url="https://download.pytorch.org/models/vgg16-397923af.pth",
            source="torchvision VGG16 ImageNet weights (the backbone VGG-LPIPS uses)",
            license="BSD-3-Clause (torchvision)",
            task="LPIPS backbone (perceptual loss)",
            input="[B,3,H,W] RGB scaled to [-1,1], then LPIPS's shift/scale layer",
        ),
        ModelSpec(
            name="ultraface_rfb_320",
            filename="ultraface_rfb_320.onnx",
            subdir="face_detection",
            sha256="34cd7e60aeff28744c657de7a3dc64e872d506741de66987f3426f2b79f88017",
            url="https://raw.githubusercontent.com/Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB/"
            "dffdddda9794/models/onnx/version-RFB-320.onnx",
            source="Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB",
            license="MIT",
            task="face detection (boxes only)",
            input="[1,3,240,320] RGB, (x-127)/128",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise AvatarError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "avatar" / "models"


MODELS_OPTION_HELP = (
    "Folder searched first for model files; then the folders of $AVATAR_MODELS (a list separated by "
    f"'{os.pathsep}'; relative entries are from the current directory), then the cache."
)
"""The ``--models`` help of every command (one text, where the search order is defined)."""


def _env_dirs() -> list[str]:
    return [p for p in os.environ.get("AVATAR_MODELS", "").split(os.pathsep) if p]


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute against the current directory (``~`` expanded; links kept as written)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def absolutize_models_env() -> None:
    """Rewrite ``$AVATAR_MODELS`` with absolute folders (relative ones against the current directory).

    The CLI calls this once at startup, so later lookups and every process the tool starts (workers,
    which inherit the environment) see the same folders whatever their working directory."""
    entries = _env_dirs()
    if entries:
        os.environ["AVATAR_MODELS"] = os.pathsep.join(str(_absolute(p)) for p in entries)


_warned_missing: set[str] = set()


def _warn_missing(path: Path, origin: str) -> None:
    """One stderr line per missing folder and process (a list entry may be a typo)."""
    if str(path) in _warned_missing:
        return
    _warned_missing.add(str(path))
    sys.stderr.write(f"warning: {origin} folder {path} does not exist; it is skipped when looking for models\n")


def search_dirs(models_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for model files, in order, absolute: ``models_dir`` (``--models``), the
    ``os.pathsep``-separated ``$AVATAR_MODELS`` entries, the cache. Missing folders (other than the
    cache, created by the first download) stay in the list, so an error can say where it looked,
    and are reported once on stderr."""
    dirs: list[Path] = []
    origins = ([(models_dir, "--models")] if models_dir else []) + [(p, "$AVATAR_MODELS") for p in _env_dirs()]
    for entry, origin in origins:
        path = _absolute(entry)
        if not path.is_dir():
            _warn_missing(path, origin)
        if path not in dirs:
            dirs.append(path)
    cache = cache_dir()
    if cache not in dirs:
        dirs.append(cache)
    return dirs


def _link_stub_target(path: Path) -> Path | None:
    """The folder a git symlink stub points to: a small text file holding one relative path, written
    where a checkout or copy does not keep symbolic links. None when ``path`` is not such a file."""
    try:
        if not path.is_file() or path.stat().st_size > 1024:
            return None
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text or "\n" in text or "\0" in text:
        return None
    target = (path.parent / text).resolve()  # relative to the stub's folder, as a link would be
    return target if target.is_dir() else None


def _below(folder: Path, relative: str) -> Path:
    """``folder / relative`` with git symlink stubs on the way followed."""
    current = folder
    for part in Path(relative).parts:
        current = current / part
        if not current.is_dir():
            current = _link_stub_target(current) or current
    return current


def layout_candidates(filename: str, subdir: str, dirs: list[Path]) -> list[Path]:
    """Where ``filename`` may sit in each of ``dirs``: ``<dir>/<subdir>/``, then below each shorter tail
    of ``subdir`` (``3dmm/ict_facekit`` -> ``ict_facekit``), then ``<dir>/`` itself."""
    parts = Path(subdir).parts
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    out: list[Path] = []
    for d in dirs:
        for tail in tails:
            out.append(_below(d, tail) / filename)
        out.append(d / filename)
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=64)
def _hash_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _hash_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _candidates(spec: ModelSpec, dirs: list[Path]) -> list[Path]:
    return layout_candidates(spec.filename, spec.subdir, dirs)


def find_file(filename: str, subdir: str, models_dir: str | os.PathLike | None = None) -> Path | None:
    """The first copy of ``filename`` in the search order (layouts as in the module docstring),
    unverified (for user-supplied files that are not in the registry, such as the BFM)."""
    for candidate in layout_candidates(filename, subdir, search_dirs(models_dir)):
        if candidate.is_file():
            return candidate
    return None


def npz_fingerprint(path: str | os.PathLike) -> dict[str, dict]:
    """Content fingerprint of an npz: per array its shape and, for floats, the float64 sum and sum of
    absolute values; for integer, bool and string arrays the first 16 hex digits of a sha256 of the
    values (integers as little-endian int64, strings joined by newlines)."""
    import numpy as np

    out: dict[str, dict] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in sorted(data.files):
            array = data[key]
            entry: dict = {"shape": list(array.shape)}
            if array.dtype.kind == "f":
                wide = array.astype(np.float64)
                entry["sum"] = round(float(wide.sum()), 6)
                entry["abs_sum"] = round(float(np.abs(wide).sum()), 6)
            elif array.dtype.kind in "iub":
                entry["sha256"] = hashlib.sha256(np.ascontiguousarray(array, dtype="<i8").tobytes()).hexdigest()[:16]
            else:
                text = "\n".join(str(x) for x in array.ravel())
                entry["sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
            out[key] = entry
    return out


def content_mismatch(expected: dict, actual: dict, rtol: float = 1e-5) -> str | None:
    """Why ``actual`` (a :func:`npz_fingerprint`) does not match ``expected``; None when it does."""
    for key, ref in expected.items():
        got = actual.get(key)
        if got is None:
            return f"array {key!r} is missing"
        if got["shape"] != ref["shape"]:
            return f"array {key!r} has shape {tuple(got['shape'])}, expected {tuple(ref['shape'])}"
        if "sha256" in ref and got.get("sha256") != ref["sha256"]:
            return f"array {key!r} has different values"
        for stat in ("sum", "abs_sum"):
            if stat in ref:
                if stat not in got:
                    return f"array {key!r} is not a float array"
                tol = rtol * abs(ref["abs_sum"]) + 1e-6
                if abs(got[stat] - ref[stat]) > tol:
                    return f"array {key!r} differs ({stat} {got[stat]:.6g}, expected {ref[stat]:.6g})"
    return None


@functools.lru_cache(maxsize=16)
def _fingerprint_cached(path: str, size: int, mtime_ns: int) -> dict:
    return npz_fingerprint(path)


def _content_problem(spec: ModelSpec, path: Path) -> str | None:
    stat = path.stat()
    try:
        actual = _fingerprint_cached(str(path), stat.st_size, stat.st_mtime_ns)
    except Exception as exc:  # not an npz, truncated, ...
        return f"unreadable as npz ({exc.__class__.__name__})"
    return content_mismatch(spec.content or {}, actual)


def find_local(spec: ModelSpec, models_dir: str | os.PathLike | None = None) -> Path | None:
    """The first local copy of ``spec`` in the search order, verified; None if there is none."""
    for candidate in _candidates(spec, search_dirs(models_dir)):
        if candidate.is_file():
            verify(spec, candidate)
            return candidate
    return None


def verify(spec: ModelSpec, path: Path) -> str:
    """sha256 of ``path`` after checking it against the pin (or, for built files, the content)."""
    digest = file_sha256(path)
    if spec.sha256 and digest != spec.sha256:
        if spec.content is not None:
            problem = _content_problem(spec, path)
            if problem is None:
                return digest
            raise AvatarError(
                f"model {spec.name!r}: {path} is neither the pinned file (sha256 {spec.sha256[:12]}…) nor a "
                f"build with the same content: {problem} (delete it to download and build again)"
            )
        raise AvatarError(
            f"model {spec.name!r}: {path} has sha256 {digest[:12]}…, expected {spec.sha256[:12]}… "
            "(corrupt or a different file; delete it to download again)"
        )
    return digest


def download(spec: ModelSpec, dest_dir: Path | None = None, timeout: float = 60.0) -> Path:
    """Download ``spec`` into the cache (atomically: temp file, verify, rename).

    The folders of the target are created only once the server answers, and removed again (when
    this call created them and they are still empty) if the download or its check fails: an
    offline run leaves no empty cache folders behind."""
    target = (dest_dir or cache_dir()) / spec.subdir / spec.filename
    new_folders = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
                raw = Path(tmp) / "payload"
                with open(raw, "wb") as out:
                    shutil.copyfileobj(response, out)
                payload = _payload(spec, raw, Path(tmp))
                os.replace(payload, target)
    except BaseException:
        for folder in new_folders:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (another download landed) or already gone
                pass
        raise
    return target


def _payload(spec: ModelSpec, raw: Path, tmp: Path) -> Path:
    """The model file made from the downloaded ``raw`` (built, or taken out of its archive), checked."""
    if spec.build:
        payload = tmp / spec.filename
        _builder(spec.build)(raw, payload)
    elif spec.archive_member:
        with zipfile.ZipFile(raw) as archive:
            member = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == spec.archive_member), None)
            if member is None:
                raise AvatarError(f"model {spec.name!r}: {spec.archive_member} is not in {spec.url}")
            payload = tmp / spec.filename
            with archive.open(member) as src, open(payload, "wb") as out:
                shutil.copyfileobj(src, out)
    else:
        payload = raw
    digest = sha256_file(payload)
    if spec.sha256 and digest != spec.sha256:
        problem = _content_problem(spec, payload) if spec.content is not None else "no content fingerprint"
        if problem is not None:
            raise AvatarError(
                f"model {spec.name!r}: downloaded file has sha256 {digest}, expected {spec.sha256} ({problem})"
            )
    return payload


def _builder(reference: str):
    """The function named by ``"module:function"``."""
    import importlib

    module_name, _, function = reference.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _downloads_allowed(allow_download: bool) -> bool:
    return allow_download and os.environ.get("AVATAR_OFFLINE", "") not in ("1", "true", "yes")


def resolve(name: str, models_dir: str | os.PathLike | None = None, *, allow_download: bool = True) -> Path:
    """Path of model ``name``: a verified local copy, else a fresh download, else a clear error."""
    return resolve_all([name], models_dir, allow_download=allow_download)[name]


def resolve_all(
    names: Iterable[str], models_dir: str | os.PathLike | None = None, *, allow_download: bool = True
) -> dict[str, Path]:
    """``{name: path}`` for every model of ``names`` (verified local copies, else downloads), looked up
    before a stage does any work.

    Raises:
        ModelNotFoundError: one line naming every model that is neither here nor downloadable (its
            file and source), where they were looked for, and why nothing was downloaded.
        AvatarError: an unknown name, or a local copy that fails its check.
    """
    specs = [get_spec(name) for name in dict.fromkeys(names)]
    found: dict[str, Path] = {}
    missing: list[ModelSpec] = []
    for spec in specs:
        path = find_local(spec, models_dir)
        if path is None:
            missing.append(spec)
        else:
            found[spec.name] = path
    reasons: list[str] = []
    if missing and _downloads_allowed(allow_download):
        for spec in list(missing):
            try:
                found[spec.name] = download(spec)
                missing.remove(spec)
            except AvatarError:
                raise
            except Exception as exc:  # network errors come in many classes; all mean "offline" here
                reasons.append(f"{spec.name}: {exc.__class__.__name__}: {exc}")
    if missing:
        raise ModelNotFoundError(missing_models_message(missing, models_dir, reasons or ["downloads disabled"]))
    return {spec.name: found[spec.name] for spec in specs}


def missing_models_message(missing: list[ModelSpec], models_dir, reasons: list[str]) -> str:
    """One line: each missing model (name, file, source), the folders searched, why nothing downloaded."""
    where = ", ".join(str(d) + ("" if d.is_dir() else " (missing)") for d in search_dirs(models_dir))
    items = "; ".join(
        f"{spec.name!r} ({spec.filename}, source: {spec.url}"
        + (f", built from that download by {spec.build}" if spec.build else "") + ")"
        for spec in missing
    )
    head = f"model {items} not found" if len(missing) == 1 else f"{len(missing)} models not found: {items}"
    files = ", ".join(f"<dir>/{spec.subdir}/{spec.filename}" for spec in missing)
    return (
        f"{head}; looked in {where}; {'; '.join(dict.fromkeys(reasons))}. Put {files} in one of those folders "
        "(or point --models / AVATAR_MODELS at the folder holding them), or run `avatar models --download` online"
    )


def describe(name: str, path: Path) -> dict[str, str]:
    """What a protocol block or provenance record says about a resolved model."""
    spec = get_spec(name)
    return {"name": name, "file": spec.filename, "sha256": file_sha256(path), "source": spec.source}
