"""The INT8 refinement search (exporters.refine) on a fake gate and builder: which layer
types go to float, how far the binary search quantizes back, when it gives up."""

import dataclasses
import re
from pathlib import Path

import pytest

from angle_rt.errors import ParityError
from angle_rt.manifest import Artifact, Manifest, TensorSpec
from exporters.gates import Candidate
from exporters.refine import verified

FFN = [f"ffn/L{i}" for i in range(12)]  # outlier order: fewest outliers first
ATTN = [f"attn/L{i}" for i in range(12)]
GROUPS = [("ffn", r"^ffn/L\d+$"), ("attn", r"^attn/L\d+$"), ("out", r"^out/L\d+$"),
          ("emb", r"^emb/L\d+$")]  # at most half of the types may go to float


class FakeBuilder:
    """Remembers the exclusion each artifact was last built with."""

    def __init__(self, bundle: Path, default: tuple[str, ...] = ()) -> None:
        self.bundle, self.default = bundle, default
        self.excluded: dict[str, tuple[str, ...]] = {}
        self.builds = 0

    def build(self, precision, exclude=(), folder=None):
        self.builds += 1
        if folder is None:
            self.excluded[precision] = tuple(exclude)
        return (folder or self.bundle) / f"model.{precision}.onnx"

    def default_exclude(self, precision):
        return self.default

    def candidates(self, precision):
        return GROUPS

    def outlier_order(self, patterns):
        regexes = [re.compile(p) for p in patterns]
        return [n for n in FFN + ATTN if any(r.search(n) for r in regexes)]


class FakeGate:
    """Passes an artifact iff every node in `bad[precision]` is kept in float."""

    def __init__(self, builder: FakeBuilder, bad: dict[str, set[str]]) -> None:
        self.builder, self.bad, self.checks = builder, bad, 0

    def in_float(self, precision: str, extra: tuple[str, ...] = ()) -> set[str]:
        regexes = [re.compile(p) for p in (*self.builder.excluded.get(precision, ()), *extra)]
        return {n for n in FFN + ATTN if any(r.search(n) for r in regexes)}

    def check(self, art):
        self.checks += 1
        missing = self.bad.get(art.precision, set()) - self.in_float(art.precision)
        if missing:
            raise ParityError(f"{art.file}: min cosine 0.9 ({len(missing)} bad layers)")
        return {"min_cosine": 0.99, "passed": True}

    def rank(self, precision, exclude, candidates, build):
        found = []
        for name, regex in candidates:
            if regex in exclude:
                continue
            build(precision, (*exclude, regex), self.builder.bundle / "trial")
            fixed = len(self.bad.get(precision, set()) & self.in_float(precision, (regex,)))
            found.append(Candidate(0.9 + fixed / 100, name, regex))
        return sorted(found, key=lambda c: -c.min_cosine)

    def summary(self):
        return {"n_texts": 1}


def _artifact_of(bundle, file, precision):
    return Artifact(file=file, format="onnx", precision=precision, sha256="0" * 64,
                    size_bytes=1)


def _manifest(*precisions):
    arts = tuple(_artifact_of(None, f"model.{p}.onnx", p) for p in precisions)
    ids = TensorSpec("input_ids", "int64", ("batch", "sequence"))
    mask = TensorSpec("attention_mask", "int64", ("batch", "sequence"))
    return Manifest(source={}, architecture="encoder", model_type="bert", pooling="mean",
                    max_length=8, embedding_dim=4, padding_side="right", pad_token_id=0,
                    normalized=False, inputs=(ids, mask),
                    outputs=(TensorSpec("embedding", "float32", ("batch", 4)),),
                    tokenizer={"file": "tokenizer.json", "sha256": "0"}, artifacts=arts)


def _run(tmp_path, bad, *precisions, default=()):
    builder = FakeBuilder(tmp_path, default)
    gate = FakeGate(builder, bad)
    out = verified(_manifest(*precisions), gate, builder, _artifact_of)
    return out, builder, gate


def test_passing_artifacts_are_checked_once_and_not_rebuilt(tmp_path):
    out, builder, gate = _run(tmp_path, {}, "fp32", "int8", "int8-dynamic")
    assert gate.checks == 3 and builder.builds == 0
    assert all(a.parity == {"min_cosine": 0.99, "passed": True} for a in out.artifacts)
    assert out.parity == {"n_texts": 1}


def test_search_keeps_the_type_then_quantizes_back_the_longest_passing_prefix(tmp_path):
    bad = {"int8": {"ffn/L7", "ffn/L9", "ffn/L11"}}
    out, builder, _ = _run(tmp_path, bad, "fp32", "int8")
    art = out.artifacts[1]
    # ffn/L0..L6 quantize again; from the first bad layer on, everything stays in float
    assert art.parity["kept_in_float"] == FFN[7:]
    assert builder.excluded["int8"] == tuple("^" + re.escape(n) + "$" for n in FFN[7:])
    assert (tmp_path / "angle_rt.json").is_file()  # each rebuild rewrote the manifest


def test_a_failed_last_trial_is_rebuilt_as_the_chosen_prefix(tmp_path):
    bad = {"int8-dynamic": {"ffn/L0"}}  # nothing can be quantized back
    out, builder, _ = _run(tmp_path, bad, "int8-dynamic")
    assert out.artifacts[0].parity["kept_in_float"] == FFN
    assert builder.excluded["int8-dynamic"] == tuple("^" + re.escape(n) + "$" for n in FFN)


def test_two_types_in_float_when_both_hold_bad_layers(tmp_path):
    bad = {"int8": {"ffn/L3", "attn/L5"}}
    out, _, _ = _run(tmp_path, bad, "int8")
    kept = out.artifacts[0].parity["kept_in_float"]
    assert "ffn/L3" in kept and "attn/L5" in kept
    assert set(kept) <= set(FFN + ATTN) and "ffn/L0" not in kept


def test_user_exclusions_are_kept_and_not_searched(tmp_path):
    default = (r"^attn/L0$",)
    bad = {"int8": {"ffn/L2"}}
    out, builder, _ = _run(tmp_path, bad, "int8", default=default)
    assert builder.excluded["int8"][0] == r"^attn/L0$"
    assert out.artifacts[0].parity["kept_in_float"] == FFN[2:]


def test_gives_up_with_advice_past_half_the_types_and_for_float_precisions(tmp_path):
    bad = {"int8": {"ffn/L0", "attn/L0", "out/L0"}}  # out/L* matches no node: never fixed
    with pytest.raises(ParityError, match="--int8-exclude"):
        _run(tmp_path, bad, "int8")
    with pytest.raises(ParityError, match="--fp16-exclude"):
        _run(tmp_path, {"fp16": {"ffn/L0"}}, "fp16")
    with pytest.raises(ParityError, match="no single layer type"):
        _run(tmp_path, {"fp32": {"ffn/L0"}}, "fp32")


def test_manifest_entries_stay_in_order(tmp_path):
    out, _, _ = _run(tmp_path, {"int8": {"ffn/L1"}}, "fp32", "fp16", "int8", "int8-dynamic")
    assert [a.precision for a in out.artifacts] == ["fp32", "fp16", "int8", "int8-dynamic"]
    assert dataclasses.replace(out, artifacts=()).parity == {"n_texts": 1}
