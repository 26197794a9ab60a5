"""Optional packages of the file job, imported on first use with the extra that provides them."""

from __future__ import annotations

from types import ModuleType

from angle_rt._imports import lazy_import
from angle_rt.errors import BackendUnavailableError

EXTRAS = {"pyarrow": "angle-rt[embed]", "pyarrow.parquet": "angle-rt[embed]",
          "ray": "angle-rt[ray]", "ray.data": "angle-rt[ray]", "tqdm": "angle-rt[embed]"}


def need(name: str, what: str) -> ModuleType:
    """Import `name` for `what`, or BackendUnavailableError naming the pip extra."""
    try:
        return lazy_import(name)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(
            f"{what} needs {name.split('.')[0]}: pip install '{EXTRAS.get(name, name)}'"
        ) from exc


def pyarrow() -> ModuleType:
    return need("pyarrow", "Parquet input and output")


def parquet() -> ModuleType:
    need("pyarrow", "Parquet input and output")
    return need("pyarrow.parquet", "Parquet input and output")
