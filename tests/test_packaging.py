"""The installed distribution's dependency metadata (issue 12, "Packaging and install").

Reads what pip reads, `importlib.metadata.requires("angle-rt")`, and resolves each extra the
way pip does: base requirements, plus those whose marker holds for the extra, plus the extras
of `angle-rt[...]` self-references, recursively. `.ci/smoke.sh` proves the same by installing.
"""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DIST = "angle-rt"
ROOT = Path(__file__).resolve().parents[1]
SLIM_RUNTIME = {"numpy", "tokenizers", "onnxruntime"}
# both install the one `onnxruntime` package directory: whichever lands last wins
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu"}
STALE = "installed metadata differs from pyproject.toml: re-run `pip install -e '.[dev]'`"


def _requirements() -> list[Requirement]:
    try:
        return [Requirement(r) for r in metadata.requires(DIST) or []]
    except metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed (pip install -e '.[dev]')")


def _extras() -> list[str]:
    return sorted(metadata.metadata(DIST).get_all("Provides-Extra") or [])


def _applies(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def resolve(extras: set[str]) -> dict[str, Requirement]:
    """canonical name -> requirement, for `pip install angle-rt[<extras>]` on this platform."""
    reqs, known = _requirements(), set(_extras())
    todo, done, out = set(extras) | {""}, set(), {}  # "": the base requirements
    while todo:
        extra = todo.pop()
        done.add(extra)
        for req in reqs:
            if not _applies(req, extra):
                continue
            name = canonicalize_name(req.name)
            if name == DIST:
                missing = set(req.extras) - known
                assert not missing, f"[{extra}] refers to undefined extras {sorted(missing)}"
                todo |= set(req.extras) - done
            else:
                out[name] = req
    return out


def test_base_is_exactly_the_slim_runtime():
    base = resolve(set())
    assert set(base) == SLIM_RUNTIME, (
        "`pip install angle-rt` must give the runtime only (numpy, tokenizers, onnxruntime); "
        f"got {sorted(base)}")


def test_no_extra_requires_both_onnxruntime_builds():
    extras = _extras()
    assert extras, "no extras in the metadata"
    combos = {f"[{e}]": {e} for e in extras} | {f"[{','.join(extras)}]": set(extras)}
    both = {label: sorted(ORT_BUILDS) for label, es in combos.items()
            if set(resolve(es)) >= ORT_BUILDS}
    assert not both, (
        f"{both}: onnxruntime-gpu would sit beside onnxruntime (one package directory, the "
        "last installed wins); it must replace it, by hand (README, GPU install)")


def test_gpu_extra_is_tensorrt():
    gpu = resolve({"gpu"})
    assert {"tensorrt", "cuda-python"} <= set(gpu), sorted(gpu)
    assert "onnxruntime" in gpu  # the CPU runtime stays: .onnx artifacts still run


def test_export_has_what_angle_export_int8_needs():
    export = set(resolve({"export"}))
    # torch → ONNX, Q/DQ passes (onnx), calibration and the gate (onnxruntime), the model
    # (transformers, safetensors), --lora (peft), the INT8 gate's STS-B Spearman (scipy)
    need = SLIM_RUNTIME | {"torch", "transformers", "safetensors", "onnx", "peft", "tqdm",
                           "scipy"}
    assert need <= export, f"[export] lacks {sorted(need - export)}"
    # training's own stack stays in [train]
    assert "datasets" not in export


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file, lazy imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _exporter_third_party() -> set[str]:
    """Top-level third-party modules that exporters/ (demo aside) imports, following its
    imports through this repo's other packages (angle_rt/, training/, ...)."""
    own = {p.parent.name for p in ROOT.glob("*/__init__.py")}  # this repo's packages
    todo = [f"exporters.{p.stem}" for p in (ROOT / "exporters").glob("*.py")
            # `make demo` runs in the dev venv (the MiniLM package)
            if p.stem not in ("__init__", "demo")]
    seen: set[str] = set()
    third: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        path = _module_file(mod)
        if path is None:
            continue  # an attribute (from x import name), not a module
        for name in _imports(path):
            top = name.split(".")[0]
            if top in own:
                todo.append(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third


def test_export_covers_every_module_the_exporter_imports():
    dists = metadata.packages_distributions()
    export = set(resolve({"export"}))
    gaps = {}
    for mod in sorted(_exporter_third_party()):
        provided = {canonicalize_name(d) for d in dists.get(mod, [])}
        if not provided & export:
            gaps[mod] = sorted(provided) or "not installed here"
    assert not gaps, f"exporters/ imports modules that [export] does not install: {gaps}"


def test_metadata_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def key(req: Requirement) -> tuple[str, str, tuple[str, ...]]:
        return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras))

    declared = {"": {key(Requirement(r)) for r in project["dependencies"]}}
    declared |= {canonicalize_name(e): {key(Requirement(r)) for r in reqs}
                 for e, reqs in project["optional-dependencies"].items()}
    installed: dict[str, set] = {"": set()} | {e: set() for e in _extras()}
    for req in _requirements():
        extra = next((e for e in _extras() if req.marker is not None
                      and req.marker.evaluate({"extra": e})
                      and not req.marker.evaluate({"extra": ""})), "")
        installed[extra].add(key(req))
    assert installed == declared, STALE
