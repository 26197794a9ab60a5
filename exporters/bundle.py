"""Writing bundles: manifest assembly and an all-or-nothing move into place."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

import angle_rt
from angle_rt.manifest import (
    INPUT_NAMES,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    Artifact,
    Manifest,
    TensorSpec,
    sha256_file,
)
from angle_torch.model import AngleModel

EXTERNAL_DATA_SUFFIX = ".data"


@contextlib.contextmanager
def staged_dir(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` by rename.

    On any error the temporary directory is removed and `target` is left as it was.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FileExistsError(f"{target} already exists and is not empty; pass --force to "
                              "replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # not mkdtemp: its 0700 would leave the bundle unreadable to a server running as another
    # user; mkdir gives the permissions of any new directory (0777 less the umask)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def onnx_artifact(bundle: Path, file: str, precision: str) -> Artifact:
    """Checksums for an ONNX file and the external-data files it references."""
    extra = [{"file": name, "sha256": sha256_file(bundle / name)}
             for name in external_data_files(bundle / file)]
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


def consolidate_external_data(path: Path) -> None:
    """Rewrite a graph whose tensors were spread over many files into one `.data` file."""
    if not external_data_files(path):
        return
    model = onnx.load(str(path), load_external_data=True)
    stale = external_data_files(path)
    for name in stale:
        (path.parent / name).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + EXTERNAL_DATA_SUFFIX, size_threshold=1024)


def source_info(model: AngleModel) -> dict[str, Any]:
    """Where the weights came from: id or path, revision, and a content hash of local weights."""
    cfg = model.backbone.config
    info: dict[str, Any] = {"model": model.name,
                            "revision": getattr(cfg, "_commit_hash", None),
                            "architectures": list(getattr(cfg, "architectures", None) or [])}
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
