"""`angle-rt serve`: an OpenAI- and TEI-compatible HTTP embedding server over `Encoder`, with
dynamic batching across requests.

The web stack comes with the ``[serve]`` extra (``pip install angle-rt[serve]``) and is
imported only by `app`, `metrics` and `server`; `batcher` and `config` need nothing beyond
the runtime, and ``import angle_rt`` never imports this package.
"""

from __future__ import annotations

import importlib.util

#: module → the distribution the [serve] extra installs for it
REQUIRED = {
    "starlette": "starlette",
    "uvicorn": "uvicorn[standard]",
    "orjson": "orjson",
    "prometheus_client": "prometheus-client",
}
INSTALL_HINT = "pip install 'angle-rt[serve]'"


def missing_dependencies() -> list[str]:
    """Distributions of the [serve] extra that are not installed here."""
    missing = []
    for module, dist in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing
