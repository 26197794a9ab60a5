"""Making reduced-precision artifacts pass their gate: every artifact is checked; an INT8
one that fails keeps its most sensitive layer types in float, one type at a time (at most
half of them), until it passes; then as many of the layers of those types as the gate
allows are quantized again, in order of activation outliers, by binary search.

The gate and the builder are passed in (`Checker`, `Rebuilder`), so this search is tested
with fakes (tests/exporters/test_refine.py) and imports neither torch nor the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from angle_rt.errors import ParityError
from angle_rt.manifest import Artifact, Manifest, write_manifest
from exporters.gates import Candidate, advice
from exporters.invariance import InvarianceError

log = logging.getLogger("angle_rt.export")


class Rebuilder(Protocol):
    """What the search needs of exporters.pipeline.ArtifactBuilder."""

    bundle: Path

    def build(self, precision: str, exclude: tuple[str, ...] = (),
              folder: Path | None = None) -> Path: ...

    def default_exclude(self, precision: str) -> tuple[str, ...]: ...

    def candidates(self, precision: str) -> list[tuple[str, str]]: ...

    def outlier_order(self, patterns: tuple[str, ...]) -> list[str]: ...


class Checker(Protocol):
    """What the search needs of exporters.gates.Gate."""

    def check(self, artifact: Artifact) -> dict[str, Any]: ...

    def rank(self, precision: str, exclude: tuple[str, ...],
             candidates: list[tuple[str, str]],
             build: Callable[[str, tuple[str, ...], Path], Path]) -> list[Candidate]: ...

    def summary(self) -> dict[str, Any]: ...


ArtifactOf = Callable[[Path, str, str], Artifact]  # (bundle, file, precision) → entry


def verified(manifest: Manifest, gate: Checker, builder: Rebuilder,
             artifact_of: ArtifactOf) -> Manifest:
    """Gate every artifact of `manifest`, refining INT8 ones that fail; the manifest with
    each artifact's parity report and the gate's summary. ParityError (with advice on what
    to keep in higher precision) when an artifact cannot be made to pass."""
    for i, art in enumerate(manifest.artifacts):
        base = exclude = builder.default_exclude(art.precision)
        auto: list[str] = []
        while True:
            try:
                info = gate.check(art)
                break
            except InvarianceError:
                raise  # the scheme depends on the batch: keeping layers in float cannot help
            except ParityError as err:
                ranked = gate.rank(art.precision, exclude, builder.candidates(art.precision),
                                   builder.build) if art.precision != "fp32" else []
                limit = len(builder.candidates(art.precision)) // 2
                if not art.precision.startswith("int8") or not ranked or len(auto) >= limit:
                    raise ParityError(f"{err}\n{advice(art.precision, ranked)}") from None
                auto.append(ranked[0].name)
                exclude = (*exclude, ranked[0].exclude)
                log.warning("%s failed its gate; keeping %s in float and retrying", art.file,
                            ranked[0].name)
                manifest, art = _rebuilt(builder, artifact_of, manifest, i, art, exclude)
        if auto:
            manifest, art, info, kept = _requantized(gate, builder, artifact_of, manifest, i,
                                                     art, base, exclude[len(base):], info)
            info["kept_in_float"] = kept
        manifest = _with_artifact(manifest, i, dataclasses.replace(art, parity=info))
    return dataclasses.replace(manifest, parity=gate.summary())


def _rebuilt(builder: Rebuilder, artifact_of: ArtifactOf, manifest: Manifest, i: int,
             art: Artifact, exclude: tuple[str, ...]) -> tuple[Manifest, Artifact]:
    """Rebuild artifact i with `exclude` kept in float; the manifest on disk follows (the
    gate opens the bundle with checksums)."""
    builder.build(art.precision, exclude)
    art = artifact_of(builder.bundle, art.file, art.precision)
    manifest = _with_artifact(manifest, i, art)
    write_manifest(builder.bundle, manifest)
    return manifest, art


def _requantized(gate: Checker, builder: Rebuilder, artifact_of: ArtifactOf,
                 manifest: Manifest, i: int, art: Artifact, base: tuple[str, ...],
                 groups: tuple[str, ...], info: dict[str, Any],
                 ) -> tuple[Manifest, Artifact, dict[str, Any], list[str]]:
    """Whole layer types were kept in float; usually a few of their layers cause the
    damage. Order those layers by activation outliers (fewest first) and find, by binary
    search with the full gate deciding each step, the longest prefix that can be
    quantized again. Returns the passing artifact and the nodes left in float."""
    nodes = builder.outlier_order(groups)

    def trial(k: int) -> tuple[Manifest, Artifact]:
        keep = tuple("^" + re.escape(n) + "$" for n in nodes[k:])
        return _rebuilt(builder, artifact_of, manifest, i, art, (*base, *keep))

    lo, hi, on_disk, best = 0, len(nodes), 0, (manifest, art, info)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        m, a = trial(mid)
        on_disk = mid
        try:
            best, lo = (m, a, gate.check(a)), mid
        except ParityError:
            hi = mid - 1
    if on_disk != lo:  # the file on disk is a failed trial: rebuild the chosen one
        m, a = trial(lo)
        best = (m, a, gate.check(a))
    log.info("%s: %d of the %d layers kept in float by type quantized again", art.file, lo,
             len(nodes))
    return (*best, list(nodes[lo:]))


def _with_artifact(manifest: Manifest, i: int, art: Artifact) -> Manifest:
    arts = list(manifest.artifacts)
    arts[i] = art
    return dataclasses.replace(manifest, artifacts=tuple(arts))
