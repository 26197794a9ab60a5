"""Writing bundles: manifest assembly and an all-or-nothing move into place."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

import angle_rt
from angle_rt.manifest import (
    INPUT_NAMES,
    MANIFEST_FILE,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    Artifact,
    Manifest,
    TensorSpec,
    sha256_file,
)

try:
    import fcntl
except ImportError:  # Windows: no flock, so no sweep of killed exports' staging
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from angle_torch.model import AngleModel

log = logging.getLogger("angle_rt.export")
STAGING_LOCK = ".export.lock"  # held by the live export that stages in its directory

EXTERNAL_DATA_SUFFIX = ".data"
# protobuf cannot serialize a message over 2 GiB; graphs whose tensors pass this keep them
# in one external `<file>.data` beside the graph (margin left for the graph itself)
MAX_INLINE_BYTES = 1_800_000_000


@contextlib.contextmanager
def staged_dir(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` by rename.

    On any error the temporary directory is removed and `target` is left as it was.
    """
    target = Path(os.path.abspath(target))  # "-o ." / "x/..": a name to stage beside
    _check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_killed_staging(target)
    # not mkdtemp: its 0700 would leave the bundle unreadable to a server running as another
    # user; mkdir gives the permissions of any new directory (0777 less the umask)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        with _staging_lock(tmp):
            yield tmp
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _staging_lock(tmp: Path) -> Iterator[None]:
    """Hold a flock on tmp/STAGING_LOCK while the export runs: a SIGKILLed export (OOM
    killer, kill -9) cannot remove its staging, and the lock, released by its death, tells
    the next export that the directory is garbage. Unlinked before release, so the bundle
    does not carry it and a sweep never takes a finishing export's directory."""
    if fcntl is None:
        yield
        return
    path, fresh = tmp / STAGING_LOCK, tmp / f"{STAGING_LOCK}.new"
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(fresh, path)  # a sweep sees the lock file only once it is held
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def sweep_killed_staging(target: Path) -> list[Path]:
    """Remove the staging directories of exports to `target` that were killed (their lock
    file is there and no live process holds it); those of live exports, and any without a
    lock file, are left alone. Returns what was removed."""
    if fcntl is None or not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{12}}")
    removed = []
    for tmp in target.parent.iterdir():
        if pattern.fullmatch(tmp.name) and tmp.is_dir() and _abandoned(tmp / STAGING_LOCK):
            size = _size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("removed %s, a killed export's staging directory (%.0f MB)", tmp,
                        size / 1e6)
            removed.append(tmp)
    return removed


def _size(folder: Path) -> int:
    """Bytes under `folder`; files that vanish meanwhile (another export's sweep) count 0."""
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _abandoned(lock: Path) -> bool:
    """True when `lock` exists and can be locked: its export died holding it. A live export
    holds the lock until after unlinking the file, so a lock taken on a file still linked
    here belongs to no one."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        return os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _check_target(target: Path, force: bool) -> None:
    """Refuse, before any work, an output that cannot or must not be replaced: --force
    replaces a bundle, not a directory of other files (the model's own, say)."""
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:  # the swap would rename it away under us
        raise FileExistsError(f"{target} is the current directory or holds it; export into a "
                              f"new directory (e.g. {target / 'bundle'})")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and os.path.ismount(target):
        raise OSError(f"{target} is a mount point, which a finished bundle cannot be renamed "
                      f"onto; export into a directory inside it (e.g. {target / 'bundle'})")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{target} already exists and is not empty; pass --force to "
                              "replace it")
    if not (target / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{target} is not a bundle (no {MANIFEST_FILE}); --force "
                              "replaces a bundle only: choose another output directory")


def _swap(tmp: Path, target: Path) -> None:
    """Rename `tmp` onto `target`; the old bundle goes only once the new one is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # a killed export's, under a reused pid
    if target.exists():
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def onnx_artifact(bundle: Path, file: str, precision: str) -> Artifact:
    """Checksums for an ONNX file and the external-data files it references (checked to be
    loadable from the graph's folder, as ONNX Runtime and TensorRT's parse_from_file read
    them)."""
    check_external_data(bundle / file)
    names = external_data_files(bundle / file)
    mode = (bundle / file).stat().st_mode & 0o777
    for name in names:  # onnx writes data files 0600: readable as the graph is (umask)
        (bundle / name).chmod(mode)
    extra = [{"file": name, "sha256": sha256_file(bundle / name)} for name in names]
    path = bundle / file
    return Artifact(file=file, format="onnx", precision=precision, sha256=sha256_file(path),
                    size_bytes=path.stat().st_size, external_data=tuple(extra))


def external_data_files(path: Path) -> list[str]:
    """Names of external tensor files an ONNX graph refers to (relative to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in init.external_data if e.key == "location"}
    return sorted(names)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes the graph's initializers take (whether loaded or external)."""
    total = 0
    for t in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        total += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def needs_external(nbytes: int) -> bool:
    """Whether tensors of `nbytes` must leave the protobuf (see MAX_INLINE_BYTES)."""
    return nbytes > MAX_INLINE_BYTES


def save_onnx(model: onnx.ModelProto, path: Path, external: bool | None = None) -> Path:
    """Write `model` to `path`; its tensors go to one `<name>.data` file beside it when they
    pass MAX_INLINE_BYTES (or `external` says so). A stale data file is removed first (onnx
    appends to an existing one). Saved externally, `model`'s tensors become references to
    that file (onnx changes the proto): load it again to save it elsewhere."""
    path = Path(path)
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    data.unlink(missing_ok=True)
    if external is None:
        external = needs_external(tensor_bytes(model))
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def check_model_file(path: Path) -> None:
    """onnx's checker by path, which reads graphs of any size (not an in-memory copy)."""
    onnx.checker.check_model(str(path))


def check_external_data(path: Path) -> None:
    """Every external tensor of the graph at `path` lies in a file beside it (a plain name,
    no directories), which exists and is long enough: what a loader that resolves locations
    against the graph's folder (ONNX Runtime, TensorRT's parse_from_file) needs."""
    model = onnx.load(str(path), load_external_data=False)
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or Path(loc).name != loc:
            raise ValueError(f"{path.name}: tensor {t.name} is stored at {loc!r}, not in a "
                             "file beside the graph")
        if loc not in sizes:
            target = path.parent / loc
            if not target.is_file():
                raise ValueError(f"{path.name}: external data file {loc} is missing")
            sizes[loc] = target.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[loc]:
            raise ValueError(f"{path.name}: tensor {t.name} ends at byte {end} of {loc}, "
                             f"which has {sizes[loc]}")


def consolidate_external_data(path: Path) -> None:
    """Rewrite a graph whose tensors were spread over many files (torch.onnx's way past
    2 GB) into one `.data` file; an inline graph whose tensors pass MAX_INLINE_BYTES moves
    them there too."""
    if not external_data_files(path):
        model = onnx.load(str(path), load_external_data=False)
        if needs_external(tensor_bytes(model)):
            save_onnx(onnx.load(str(path)), path, external=True)
        return
    model = onnx.load(str(path), load_external_data=True)
    stale = external_data_files(path)
    for name in stale:
        (path.parent / name).unlink()
    save_onnx(model, path, external=True)


def source_info(model: AngleModel) -> dict[str, Any]:
    """Where the weights came from: id or path, revision, and a content hash of local weights."""
    cfg = model.backbone.config
    info: dict[str, Any] = {"model": model.name,
                            "revision": getattr(cfg, "_commit_hash", None),
                            "architectures": list(getattr(cfg, "architectures", None) or [])}
    if model.adapter:
        info["lora"] = model.adapter
    start = model.settings.billm_start
    if start is not None:  # the bidirectional mask is in the graph; recorded for people
        n = int(cfg.num_hidden_layers)
        info["billm"] = {"start_layer": start, "num_layers": n,
                         "bidirectional_layers": list(range(start, n)),
                         "semantics": "angle_emb BiLLM_START_INDEX: layers ≥ start attend "
                                      "bidirectionally (pads masked)"}
    local = Path(model.name)
    if local.is_dir():
        weights = sorted(p for p in local.iterdir()
                         if p.suffix in (".safetensors", ".bin") and p.is_file())
        info["weights_sha256"] = {p.name: sha256_file(p) for p in weights}
    return info


def build_manifest(model: AngleModel, artifacts: list[Artifact], tokenizer_sha: str,
                   normalize: bool, parity: dict[str, Any]) -> Manifest:
    s = model.settings
    ids, mask = (TensorSpec(name, "int64", ("batch", "sequence")) for name in INPUT_NAMES)
    out = TensorSpec(OUTPUT_NAME, "float32", ("batch", model.embedding_dim))
    return Manifest(
        source=source_info(model),
        architecture="decoder" if s.is_decoder else "encoder",
        model_type=model.backbone.config.model_type,
        pooling=str(s.pooling),
        max_length=s.max_length,
        embedding_dim=model.embedding_dim,
        padding_side=s.padding_side,
        pad_token_id=model.pad_token_id,
        normalized=normalize,
        inputs=(ids, mask),
        outputs=(out,),
        tokenizer={"file": TOKENIZER_FILE, "sha256": tokenizer_sha},
        artifacts=tuple(artifacts),
        default_prompt=s.default_prompt,
        prompts=dict(s.prompts),
        parity=parity,
        writer=f"angle_rt {angle_rt.__version__} "
               f"({datetime.now(timezone.utc):%Y-%m-%dT%H:%MZ})",
    )
