"""The bundle manifest (`angle_rt.json`): schema, reading, writing and checksums.

The runtime owns this schema; exporters build a `Manifest` and call `write_manifest`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from angle_rt.errors import BundleError, BundleVersionError, ChecksumError

FORMAT_VERSION = 1
MANIFEST_FILE = "angle_rt.json"
TOKENIZER_FILE = "tokenizer.json"
ARCHITECTURES = ("encoder", "decoder")
PADDING_SIDES = ("right", "left")
# the graph's I/O: (input_ids, attention_mask) [batch, sequence] → embedding [batch, dim]
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
# artifact file per precision: ONNX graphs (fp32 is always there) and TensorRT engines
ONNX_FILES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "bf16": "model.bf16.onnx",
    "int8": "model.int8.onnx",
    "int8-dynamic": "model.int8-dynamic.onnx",
}
ENGINE_FILES = {p: f"engine.{p}.plan" for p in ("fp32", "fp16", "bf16", "int8")}


def artifact_file(precision: str, layers: int | None = None, engine: bool = False) -> str:
    """The file name of an artifact; depth variants insert `L<k>`.

    >>> artifact_file("fp16"), artifact_file("fp32", 3), artifact_file("int8", 3, engine=True)
    ('model.fp16.onnx', 'model.L3.onnx', 'engine.L3.int8.plan')
    """
    name = (ENGINE_FILES if engine else ONNX_FILES)[precision]
    if layers is None:
        return name
    stem, rest = name.split(".", 1)
    return f"{stem}.L{layers}.{rest}"
ARTIFACT_FORMATS = ("onnx", "tensorrt")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class Artifact:
    """One model file in the bundle: an ONNX graph or a TensorRT engine."""

    file: str
    format: str
    precision: str
    sha256: str
    size_bytes: int
    external_data: tuple[dict[str, str], ...] = ()  # {file, sha256} beside a >2 GB graph
    parity: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # TensorRT version, GPU, profiles
    layers: int | None = None  # a depth variant: the backbone cut after this layer (ESE)
    # a depth variant with weights of its own ({"kind": "distilled", "model": "layers-3",
    # ...}: training.depth); None: the cut shares the full model's weights
    depth_source: dict[str, Any] | None = None
    # how an INT8 artifact quantizes: {"activations": "per-token" | "static", "weights":
    # "per-channel", "weight_pair_max": 128 (exact on every x86 host: no aligned pair of
    # weights along K sums past 128; absent: full range, saturates on AVX2)};
    # None for float artifacts and for bundles written before it was recorded
    quantization: dict[str, Any] | None = None

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's vector from this artifact is independent of its batch: what its
        export measured, else known from its kind (float and static INT8 are; dynamic INT8
        is only with per-token activation scales: older bundles' scales were per batch)."""
        measured = (self.parity or {}).get("batch_invariance")
        if isinstance(measured, dict) and "passed" in measured:
            return bool(measured["passed"])
        if self.precision == "int8-dynamic":
            return (self.quantization or {}).get("activations") == "per-token"
        return True


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to turn text into the exported model's vectors."""

    source: dict[str, Any]
    architecture: str
    model_type: str
    pooling: str
    max_length: int
    embedding_dim: int
    padding_side: str
    pad_token_id: int
    normalized: bool
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tokenizer: dict[str, str]
    artifacts: tuple[Artifact, ...]
    default_prompt: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    writer: str = ""
    format_version: int = FORMAT_VERSION

    def artifact(self, file: str) -> Artifact:
        """The artifact stored under `file`, or BundleError listing what exists."""
        for art in self.artifacts:
            if art.file == file:
                return art
        names = ", ".join(a.file for a in self.artifacts) or "none"
        raise BundleError(f"{file!r} is not an artifact of this bundle (it lists: {names})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def depths(self) -> list[int | None]:
        """The depths the bundle has artifacts for: None (the full model) and any layer cuts."""
        found = {a.layers for a in self.artifacts}
        return sorted(found, key=lambda k: (k is None, k or 0))

    def at_depth(self, layers: int | None) -> Manifest:
        """This manifest with only the artifacts of one depth (None: the full model)."""
        arts = tuple(a for a in self.artifacts if a.layers == layers)
        if not arts:
            have = ", ".join("full" if k is None else str(k) for k in self.depths())
            raise BundleError(f"this bundle has no artifacts cut at {layers} layers (depths: "
                              f"{have}); re-export with --layers {layers}")
        return dataclasses.replace(self, artifacts=arts)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Validate and write `angle_rt.json` into `bundle`."""
    _validate(manifest)
    path = Path(bundle) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def read_manifest(bundle: str | Path) -> Manifest:
    """Read and validate `angle_rt.json`; any problem is a BundleError saying what to do."""
    path = Path(bundle) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{path} not found: {bundle} is not an angle_rt bundle; create one with "
            "`angle-export --model MODEL -o DIR`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object; re-export the bundle")
    manifest = _from_dict(data, path)
    _validate(manifest)
    return manifest


def verify_checksum(bundle: str | Path, file: str, expected: str) -> None:
    """Raise ChecksumError if `bundle/file` is missing or its sha256 is not `expected`."""
    path = Path(bundle) / file
    if not path.is_file():
        raise BundleError(f"{path} is missing from the bundle; re-export it")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} does not match the manifest (sha256 {actual[:12]}…, expected "
            f"{expected[:12]}…): the file was modified or truncated; re-export the bundle"
        )


def _from_dict(data: dict[str, Any], path: Path) -> Manifest:
    version = data.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path} has no integer format_version; re-export the bundle")
    if version > FORMAT_VERSION:
        raise BundleVersionError(
            f"{path} uses bundle format {version}, written by {data.get('writer') or 'a newer'}"
            f" angle_rt; this angle_rt reads format {FORMAT_VERSION}: upgrade angle_rt or "
            "re-export with this version"
        )
    if version < 1:
        raise BundleVersionError(f"{path}: unknown bundle format {version}; re-export")
    names = {f.name for f in dataclasses.fields(Manifest)}
    required = {f.name for f in dataclasses.fields(Manifest)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - data.keys())
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}; re-export the bundle")
    kwargs = {k: v for k, v in data.items() if k in names}
    try:
        kwargs["inputs"] = tuple(_tensor(t) for t in data["inputs"])
        kwargs["outputs"] = tuple(_tensor(t) for t in data["outputs"])
        kwargs["artifacts"] = tuple(_artifact(a) for a in data["artifacts"])
    except (TypeError, KeyError) as exc:
        raise BundleError(f"{path} has a malformed entry ({exc!r}); re-export") from exc
    return Manifest(**kwargs)


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


def _artifact(d: dict[str, Any]) -> Artifact:
    known = {f.name for f in dataclasses.fields(Artifact)}
    kw = {k: v for k, v in d.items() if k in known}
    kw["external_data"] = tuple(kw.get("external_data", ()))
    return Artifact(**kw)


def _validate(m: Manifest) -> None:
    checks = [
        (m.architecture in ARCHITECTURES,
         f"architecture {m.architecture!r} not in {ARCHITECTURES}"),
        (m.padding_side in PADDING_SIDES,
         f"padding_side {m.padding_side!r} not in {PADDING_SIDES}"),
        (isinstance(m.max_length, int) and m.max_length > 0, f"max_length {m.max_length!r}"),
        (isinstance(m.embedding_dim, int) and m.embedding_dim > 0,
         f"embedding_dim {m.embedding_dim!r}"),
        (isinstance(m.pad_token_id, int), f"pad_token_id {m.pad_token_id!r}"),
        (bool(m.artifacts), "no artifacts"),
        ("file" in m.tokenizer and "sha256" in m.tokenizer, "tokenizer needs file and sha256"),
        (tuple(t.name for t in m.inputs) == INPUT_NAMES,
         f"inputs {[t.name for t in m.inputs]}"),
        (len(m.outputs) == 1, f"outputs {[t.name for t in m.outputs]}"),
    ]
    checks += [(a.format in ARTIFACT_FORMATS, f"artifact {a.file}: format {a.format!r}")
               for a in m.artifacts]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise BundleError("invalid manifest: " + "; ".join(bad) + "; re-export the bundle")


def min_tokens(pooling: str | int) -> int:
    """Tokens a text needs for the bundle's pooling: 1, or k+1 (|k| from the end) for
    pooling at token index k.

    >>> min_tokens("mean"), min_tokens(1), min_tokens("-2")
    (1, 2, 2)
    """
    text = str(pooling)
    if text.lstrip("-").isdigit():
        k = int(text)
        return k + 1 if k >= 0 else -k
    return 1
