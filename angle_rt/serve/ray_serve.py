"""`angle-rt serve --ray`: the same ASGI app as one Ray Serve deployment, past one machine.

Each replica is the single-node server minus uvicorn: its own Encoders and batchers
(`open_models`), the same routes, errors, limits, metrics and drain (`build_app`, whose
lifespan warms the models up and closes them). Ray Serve's proxy routes requests to
replicas, restarts a replica that dies or fails `check_health`, and scales the pool
between `min_replicas` and `max_replicas` on ongoing requests per replica.

    pip install 'angle-rt[serve,ray]'        # ray[serve] comes with the ray extra
    angle-rt serve BUNDLE --ray --ray-replicas 2                  # a local Ray
    angle-rt serve BUNDLE --ray auto --ray-autoscale 1:8          # a running cluster

`/metrics` answers with the replica that took the request (Ray exports its own serving
metrics cluster-wide); `/ready` is a replica's readiness.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

from angle_rt.embed import _deps
from angle_rt.serve.config import ServeConfig

log = logging.getLogger("angle_rt.serve")
DEPLOYMENT = "angle_rt"


@dataclass
class RayServeOptions:
    """How the deployment runs: a fixed pool (`replicas`) or an autoscaling one
    (`min_replicas`..`max_replicas`, `target_ongoing_requests` per replica), each replica
    with `cpus` CPUs (its ONNX Runtime threads) and `gpus` GPUs."""

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 32.0
    cpus: float = 1.0
    gpus: float = 0.0
    max_ongoing_requests: int = 512  # per replica, as --max-concurrent-requests

    def deployment_options(self, config: ServeConfig) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "name": DEPLOYMENT,
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": config.graceful_timeout,
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 30.0,
        }
        if self.min_replicas is not None or self.max_replicas is not None:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas or 1,
                "max_replicas": self.max_replicas or max(1, self.min_replicas or 1),
                "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas or 1
        return opts


def ray_options(args: argparse.Namespace) -> RayServeOptions:
    """RayServeOptions from the --ray-* flags (ValueError for a bad --ray-autoscale)."""
    opts = RayServeOptions(replicas=args.ray_replicas, cpus=args.ray_cpus_per_replica,
                           gpus=args.ray_gpus_per_replica,
                           target_ongoing_requests=args.ray_target_ongoing,
                           max_ongoing_requests=args.max_concurrent_requests)
    if args.ray_autoscale:
        lo, sep, hi = args.ray_autoscale.partition(":")
        if not (sep and lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi)):
            raise ValueError(f"--ray-autoscale takes MIN:MAX with 0 < MIN ≤ MAX, got "
                             f"{args.ray_autoscale!r}")
        opts.replicas, opts.min_replicas, opts.max_replicas = None, int(lo), int(hi)
    return opts


class Replica:
    """One replica: the server's models and app (`__serve_build_asgi_app__` hands the app
    to Ray Serve's ingress after the constructor)."""

    def __init__(self, config: ServeConfig) -> None:
        from angle_rt.serve.app import ServerState
        from angle_rt.serve.metrics import Metrics
        from angle_rt.serve.server import open_models, setup_logging

        setup_logging(config)
        metrics = Metrics()
        self.state = ServerState(open_models(config, metrics), config, metrics)

    def __serve_build_asgi_app__(self) -> Any:
        from angle_rt.serve.app import build_app

        return build_app(self.state)

    def check_health(self) -> None:
        """Ray Serve's probe: raising restarts the replica (a dead or stuck worker)."""
        for model in self.state.models.values():
            b = model.batcher
            if not b.closed and b.live_workers() < model.workers:
                raise RuntimeError(f"{model.name}: an inference worker died")
            if b.stalled_s() > self.state.config.request_timeout:
                raise RuntimeError(f"{model.name}: a batch has run {b.stalled_s():.0f} s")


def application(config: ServeConfig, options: RayServeOptions | None = None) -> Any:
    """The Ray Serve application of `config` (bind it with `serve.run`)."""
    serve = _deps.need("ray.serve", "--ray serving")
    options = options or RayServeOptions()
    cls = serve.deployment(**options.deployment_options(config))(
        serve.ingress()(type("AngleRTReplica", (Replica,), {})))
    return cls.bind(config)


def serve_on_ray(config: ServeConfig, options: RayServeOptions,
                 address: str | None = None) -> int:
    """Start the deployment behind Ray Serve's proxy on config.host:config.port and block
    until SIGTERM/SIGINT; then shut Serve down (replicas drain). 0 on a clean stop."""
    from angle_rt.ray import init_ray

    ray = init_ray(address if address not in (None, "local") else None,
                   num_cpus=None, progress=False)
    serve = _deps.need("ray.serve", "--ray serving")
    port = config.port or _free_port(config.host)  # Serve's proxy takes no port 0
    serve.start(http_options={"host": config.host, "port": port})
    serve.run(application(config, options), name=DEPLOYMENT, route_prefix="/")
    log.info("listening", extra={"fields": {
        "url": f"http://{config.host}:{port}", "models": [m.name for m in config.models],
        "ray": True, "replicas": options.replicas, "pid": os.getpid()}})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("draining", extra={"fields": {"ray": True}})
    serve.shutdown()
    ray.shutdown()
    log.info("stopped", extra={"fields": {"clean": True}})
    return 0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
