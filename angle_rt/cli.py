"""`angle-rt`: the runtime's command line (subcommands: serve, embed, calibrate).

A thin argparse shim: each subcommand declares its flags with an `add_*_args(parser)` and
runs through one function of COMMANDS. Exit status: 0 ok, 1 bad input data (embed: a
missing column, a bad row), 2 bad arguments, bundle or environment (a missing extra included).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from angle_rt import __version__
from angle_rt.embed.cli import add_calibrate_parser, add_embed_parser, run_calibrate, run_embed
from angle_rt.errors import AngleRTError
from angle_rt.serve.config import add_serve_args, config_from_args
from angle_rt.serve.ray_serve import ray_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="angle-rt",
        description="The angle_rt runtime: serve exported bundles over HTTP, embed files of "
                    "texts.",
        epilog="Exit status: 0 ok, 1 bad input data, 2 bad arguments, bundle or "
               "environment.")
    p.add_argument("--version", action="version", version=f"angle-rt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_args(sub.add_parser(
        "serve", help="OpenAI- and TEI-compatible embedding server",
        description="Serve one or more bundles over HTTP: OpenAI's POST /v1/embeddings, "
                    "TEI's /embed, /tokenize, /info; /health, /ready, /metrics. Inputs of "
                    "concurrent requests are batched together. Needs the [serve] extra.",
        epilog="Example: angle-rt serve build/minilm --port 8080; then "
               "openai.OpenAI(base_url='http://127.0.0.1:8080/v1', api_key='-')"
               ".embeddings.create(model='minilm', input=['a sentence'])."))
    add_embed_parser(sub)
    add_calibrate_parser(sub)
    return p


def run_serve(args: argparse.Namespace) -> int:
    from angle_rt.serve import INSTALL_HINT, missing_dependencies

    missing = missing_dependencies()
    if missing:
        return _fail(f"serving needs the [serve] extra: {INSTALL_HINT} (missing: "
                     f"{', '.join(missing)})")
    try:
        config = config_from_args(args)
        ray = ray_options(args)
    except ValueError as exc:
        return _fail(str(exc))
    if ray is not None:
        return _serve_on_ray(config, ray, args.ray)
    from angle_rt.serve.server import serve

    try:
        return serve(config)
    except (AngleRTError, OSError) as exc:
        return _fail(str(exc))


def _serve_on_ray(config: object, options: object, address: str) -> int:
    from angle_rt.serve.ray_serve import serve_on_ray
    from angle_rt.serve.server import setup_logging

    setup_logging(config)  # type: ignore[arg-type]
    try:
        return serve_on_ray(config, options, address)  # type: ignore[arg-type]
    except (AngleRTError, OSError) as exc:
        return _fail(str(exc))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"serve": run_serve,
                                                           "embed": run_embed,
                                                           "calibrate": run_calibrate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def _fail(message: str) -> int:
    print(f"angle-rt: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
