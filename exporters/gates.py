"""Accuracy gates: every artifact against torch fp32, on real and worst-case inputs."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from angle_rt import Encoder
from angle_rt.errors import BundleError, ParityError
from angle_rt.manifest import Artifact, min_tokens
from angle_torch.sts import StsPairs, find_shared_data, load_sts, sts_spearman
from exporters.invariance import check_invariance
from exporters.reference import MAX_REFERENCE_PARAMS, ReferenceSession, parameter_count
from exporters.texts import stress_texts, verification_texts
from exporters.verify import THRESHOLDS, compare, explain

if TYPE_CHECKING:
    from angle_torch.model import AngleModel

log = logging.getLogger("angle_rt.export")
MAX_SPEARMAN_DROP = 1.0  # INT8: STS-B dev Spearman×100 within this of fp32
# --verify-size default: every text below this many parameters, else a stratified sample
LARGE_MODEL_PARAMS = 1_000_000_000
DEFAULT_SAMPLE = 256
MIN_STS_PAIRS = 400  # a sampled gate's INT8 Spearman check: at least this many pairs


@dataclass(frozen=True)
class Candidate:
    """Keeping `name` in higher precision (via `exclude`) gives `min_cosine` on the
    sentences that failed."""

    min_cosine: float
    name: str
    exclude: str


class Gate:
    """Reference vectors computed once; `check(artifact)` passes it or raises ParityError.

    `angle` is the torch reference model; `sts` the STS pairs of the INT8 Spearman check
    (None: cosine gates only). `verify_size`: how many texts to check (None: all of them
    below LARGE_MODEL_PARAMS parameters, DEFAULT_SAMPLE above); a sample is stratified by
    token length and always keeps every worst-case input."""

    def __init__(self, angle: AngleModel, bundle: Path, normalize: bool,
                 verify_data: str | Path | None, sts: StsPairs | None,
                 progress: bool = False, verify_size: int | None = None) -> None:
        self.angle, self.bundle = angle, bundle
        self.normalize, self.progress = normalize, progress
        if verify_size is not None and verify_size < 1:
            raise ValueError(f"verify_size must be ≥ 1, got {verify_size}")
        stress = _long_enough(angle, stress_texts(angle.settings.max_length))
        texts = _long_enough(angle, verification_texts(verify_data))
        self.n_params = sum(p.numel() for p in angle.parameters())
        self.n_available = len(texts) + len(stress)
        self.verify_size = verify_size
        if verify_size is None and self.n_params >= LARGE_MODEL_PARAMS:
            verify_size = DEFAULT_SAMPLE
        if verify_size is not None and verify_size < self.n_available:
            lengths = [len(r) for r in angle.tokenizer.encode(texts,
                                                              angle.prompt_template(None))]
            rows = stratified_sample(lengths, max(verify_size - len(stress), 0))
            texts = [texts[i] for i in rows]
        self.texts = texts + stress  # the worst-case inputs last (see rank)
        self.n_stress = len(stress)
        self.source = str(verify_data) if verify_data else "built-in"
        log.info("parity gate: %d of %d texts (model: %.2fB parameters), torch fp32 vs each "
                 "artifact", len(self.texts), self.n_available, self.n_params / 1e9)
        self.ref = angle.encode(self.texts, normalize=normalize, show_progress=progress)
        self.sts = sts
        if sts is not None and len(self.texts) < self.n_available:  # sampled: STS too
            self.sts = sample_pairs(sts, max(MIN_STS_PAIRS, len(self.texts)))
        self._sts_ref: float | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.worst: list[int] = []

    def check(self, artifact: Artifact) -> dict[str, Any]:
        """The artifact's report; ParityError if it misses its threshold or the STS check."""
        enc, rows = self._encoder(self.bundle / artifact.file, artifact.precision)
        if enc is None:
            self.results[artifact.file] = rows
            return rows
        texts = [self.texts[i] for i in rows]
        got = enc.encode(texts, show_progress_bar=self.progress)
        report = compare(self.ref[rows], got, THRESHOLDS[artifact.precision])
        info = {**report.to_dict(), "runtime": enc.session.name}
        problems = [] if report.passed else [explain(report, texts, artifact.file)]
        self.worst = [rows[i] for i in report.worst]
        if self.sts is not None and artifact.precision.startswith("int8") and not problems:
            info.update(self._spearman(enc))
            if info["stsb_dev_drop"] > MAX_SPEARMAN_DROP:
                problems.append(f"{artifact.file}: STS-B dev Spearman {info['stsb_dev']:.2f} "
                                f"vs fp32 {info['stsb_dev_fp32']:.2f} (drop "
                                f"{info['stsb_dev_drop']:.2f} > {MAX_SPEARMAN_DROP})")
        if problems:
            raise ParityError("\n".join(problems))
        info["batch_invariance"] = self._invariance(enc, artifact, len(rows))
        log.info("%s: min cos %.6f, mean %.6f; alone vs batched min cos %.7f", artifact.file,
                 report.min_cosine, report.mean_cosine,
                 info["batch_invariance"]["min_cosine"])
        self.results[artifact.file] = info
        return info

    def _invariance(self, enc: Encoder, artifact: Artifact, n_checked: int) -> dict[str, Any]:
        """Alone vs batched (InvarianceError if it differs): 128 texts, fewer where the
        artifact runs on the slow reference evaluator (a subset was checked)."""
        n = 128 if n_checked == len(self.texts) else 16
        return check_invariance(enc, self.texts, artifact.precision, n_texts=n)

    def summary(self) -> dict[str, Any]:
        sampled = len(self.texts) < self.n_available
        return {"reference": "torch fp32 (angle_torch.model.AngleModel, CPU)",
                "texts": self.source, "n_texts": len(self.texts),
                "n_texts_available": self.n_available, "verify_size": self.verify_size,
                "sampling": "stratified by token length, every worst-case input kept"
                            if sampled else "all",
                "model_parameters": self.n_params,
                "max_tokens": max(len(r) for r in self.angle.tokenizer.encode(
                    self.texts, self.angle.prompt_template(None))),
                "results": self.results}

    def rank(self, precision: str, exclude: tuple[str, ...],
             candidates: list[tuple[str, str]],
             build: Callable[[str, tuple[str, ...], Path], Path]) -> list[Candidate]:
        """Try keeping each candidate (name, exclusion regex) in higher precision — `build`
        writes that trial artifact into a folder — on the worst sentences of the last
        check (and the worst-case inputs); best first."""
        n = len(self.texts)
        rows = sorted(set(self.worst) | set(range(n - self.n_stress, n)))
        texts, ref = [self.texts[i] for i in rows], self.ref[rows]
        found = []
        for name, regex in candidates:
            if regex in exclude:
                continue
            with tempfile.TemporaryDirectory(dir=self.bundle) as tmp:
                path = build(precision, (*exclude, regex), Path(tmp))
                enc, _ = self._encoder(path, precision, verify=False)
                if enc is not None:
                    got = enc.encode(texts)
                    found.append(Candidate(compare(ref, got, 0.0).min_cosine, name, regex))
        return sorted(found, key=lambda c: -c.min_cosine)

    def _encoder(self, path: Path, precision: str,
                 verify: bool = True) -> tuple[Encoder | None, Any]:
        """ONNX Runtime CPU; for graphs it cannot run (BF16), the reference evaluator on a
        subset (every worst-case input + 150 sentences) when the model is small enough."""
        try:
            return Encoder(path, backend="cpu", verify_checksums=verify), list(
                range(len(self.texts)))
        except BundleError as exc:
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            reason = f"ONNX Runtime CPU has no {precision} kernels here"
        if parameter_count(path) > MAX_REFERENCE_PARAMS:
            log.warning("%s not verified: %s; verify it on the target GPU", path.name, reason)
            return None, {"verified": False, "reason": reason + "; verify on the target GPU"}
        n, k = len(self.texts), self.n_stress
        rows = sorted(set(range(0, n - k, max(1, (n - k) // 150))) | set(range(n - k, n)))
        return Encoder(path, backend=ReferenceSession, verify_checksums=verify), rows

    def _spearman(self, enc: Encoder) -> dict[str, float]:
        n = len(self.sts.text1)
        if self._sts_ref is None:
            ref = self.angle.encode(self.sts.sentences, normalize=self.normalize)
            self._sts_ref = sts_spearman(ref[:n], ref[n:], self.sts.scores)
        got = enc.encode(self.sts.sentences)
        score = sts_spearman(got[:n], got[n:], self.sts.scores)
        return {"stsb_dev": score, "stsb_dev_fp32": self._sts_ref,
                "stsb_dev_drop": self._sts_ref - score, "stsb_dev_pairs": n}


def advice(precision: str, ranked: list[Candidate]) -> str:
    """What to keep in higher precision, as the flag to pass."""
    flag = "--fp16-exclude" if precision in ("fp16", "bf16") else "--int8-exclude"
    if not ranked:
        return "no single layer type explains the divergence"
    lines = ["keeping one of these layer types in higher precision raises the worst cosine:"]
    lines += [f"  {flag} '{c.exclude}'   ({c.name}: min cos {c.min_cosine:.5f} on the "
              "worst sentences)" for c in ranked[:4]]
    return "\n".join(lines)


def sample_pairs(sts: StsPairs, n: int) -> StsPairs:
    """`n` of the pairs (all if fewer), spread over the gold scores like the whole set."""
    if n >= len(sts.text1):
        return sts
    rows = stratified_sample([float(x) for x in sts.scores], n)
    return StsPairs([sts.text1[i] for i in rows], [sts.text2[i] for i in rows],
                    sts.scores[rows])


def stratified_sample(lengths: list[float], n: int) -> list[int]:
    """`n` row indices spread evenly over the rows sorted by length (shortest and longest
    included), in input order: every length range keeps its share.

    >>> stratified_sample([5, 1, 9, 3, 7], 3)
    [0, 1, 2]
    """
    if n >= len(lengths):
        return list(range(len(lengths)))
    if n <= 0:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if n == 1:
        return [order[-1]]
    picks = {order[int(j * (len(order) - 1) / (n - 1) + 0.5)] for j in range(n)}
    return sorted(picks)


def _long_enough(angle: AngleModel, texts: list[str]) -> list[str]:
    """Drop texts too short for token-index pooling (they are refused at encode time)."""
    need = min_tokens(angle.settings.pooling)
    if need == 1:
        return texts
    ids = angle.tokenizer.encode(texts, angle.prompt_template(None))
    return [t for t, r in zip(texts, ids, strict=True) if len(r) >= need]


def sts_pairs(path: str | Path | None) -> StsPairs | None:
    """STS pairs for the INT8 Spearman check: `path`, else STS-B dev from the shared data,
    else None (with a warning: the cosine gates still apply)."""
    if path:
        return load_sts(path)
    data = find_shared_data()
    if data is None:
        log.warning("STS-B dev not found (pass sts_data / --sts-data): the INT8 Spearman "
                    "check is skipped; cosine gates still apply")
        return None
    return load_sts(data / "sts" / "stsb-dev.jsonl")

