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
import dataclasses
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from angle_rt.embed import _deps
from angle_rt.errors import AngleRTError
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

    def deployment_options(self, config: ServeConfig) -> dict[str, Any]:
        limit = config.max_concurrent_requests
        opts: dict[str, Any] = {
            "name": DEPLOYMENT,
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            # above the app's own limit, so the app answers its JSON 429 (at exactly the
            # limit Ray queued the excess instead) and /health or /metrics still get in
            "max_ongoing_requests": limit + max(8, limit // 8),
            # the proxy's queue is bounded too: past it Ray answers 429 with Retry-After
            "max_queued_requests": limit,
            "backpressure_config": {"status_code": 429, "retry_after_s": 1},
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

    def replica_config(self, config: ServeConfig) -> ServeConfig:
        """`config` as each replica runs it: one worker on its CPUs' threads unless
        --workers / --threads say otherwise (the Encoder's default counts the whole node's
        cores, which a replica does not have), absolute paths (a replica's working directory
        is Ray's), and no x-request-id of its own (Ray's proxy sets one)."""
        threads, workers = config.threads, config.workers
        if threads is None and workers is None and self.gpus == 0:
            threads, workers = max(1, math.ceil(self.cpus)), 1
        models = [dataclasses.replace(m, path=m.path.resolve()) for m in config.models]
        ranges = config.output_ranges.resolve() if config.output_ranges else None
        return dataclasses.replace(config, models=models, threads=threads, workers=workers,
                                   output_ranges=ranges, request_id_header=False)


RAY_FLAGS = {"ray_replicas": "--ray-replicas", "ray_autoscale": "--ray-autoscale",
             "ray_target_ongoing": "--ray-target-ongoing",
             "ray_cpus_per_replica": "--ray-cpus-per-replica",
             "ray_gpus_per_replica": "--ray-gpus-per-replica"}


def ray_options(args: argparse.Namespace) -> RayServeOptions | None:
    """RayServeOptions from the --ray-* flags, None without --ray; ValueError for a bad
    --ray-autoscale or a flag that would do nothing (it was silently dropped)."""
    given = [flag for dest, flag in RAY_FLAGS.items() if getattr(args, dest, None) is not None]
    if not args.ray:
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --ray")
        return None
    if args.ray_autoscale and args.ray_replicas is not None:
        raise ValueError("--ray-replicas and --ray-autoscale exclude each other (a fixed pool "
                         "or an autoscaling one)")
    if args.ray_target_ongoing is not None and not args.ray_autoscale:
        raise ValueError("--ray-target-ongoing steers the autoscaler: give --ray-autoscale")
    opts = RayServeOptions(
        replicas=args.ray_replicas or 1,
        cpus=1.0 if args.ray_cpus_per_replica is None else args.ray_cpus_per_replica,
        gpus=args.ray_gpus_per_replica or 0.0,
        target_ongoing_requests=args.ray_target_ongoing or 32.0)
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
        from angle_rt.serve.app import Api, ServerState
        from angle_rt.serve.metrics import Metrics
        from angle_rt.serve.server import open_models, setup_logging

        setup_logging(config)
        metrics = Metrics()
        self.state = ServerState(open_models(config, metrics), config, metrics)
        self.api = Api(self.state)

    def __serve_build_asgi_app__(self) -> Any:
        from angle_rt.serve.app import build_app

        return build_app(self.state)

    async def check_health(self) -> None:
        """Ray Serve's probe, as /health judges a model (a dead or stuck worker, or an idle
        one failing a real embedding), plus a failed warm-up; raising restarts the replica."""
        if self.state.warmup_error:
            raise RuntimeError(f"warm-up failed: {self.state.warmup_error}")
        for model in self.state.models.values():
            why = await self.api.model_problem(model)
            if why is not None and why != "shutting down":
                raise RuntimeError(f"{model.name}: {why}")


def application(config: ServeConfig, options: RayServeOptions | None = None) -> Any:
    """The Ray Serve application of `config` (bind it with `serve.run`)."""
    serve = _deps.need("ray.serve", "--ray serving")
    options = options or RayServeOptions()
    cls = serve.deployment(**options.deployment_options(config))(
        serve.ingress()(type("AngleRTReplica", (Replica,), {})))
    return cls.bind(options.replica_config(config))


def serve_on_ray(config: ServeConfig, options: RayServeOptions,
                 address: str | None = None) -> int:
    """Start the deployment behind Ray Serve's proxy on config.host:config.port and block
    until SIGTERM/SIGINT; then drain: the application is deleted while the proxy stays up,
    so requests in flight get their answers (up to --graceful-timeout), and only a Ray started
    here is shut down (a cluster's other Serve applications keep running). 0 on a clean
    stop, 1 when the drain ran out of time or a second signal cut it short."""
    from angle_rt.ray import init_ray

    _check_bundles(config)
    local = address in (None, "local")
    port = config.port or _free_port(config.host)  # Serve's proxy takes no port 0
    if local and config.port:  # the proxy binds here: a port in use is a clear error now
        _free_port(config.host, port)
    ray = init_ray(None if local else address, num_cpus=None, progress=False)
    serve = _deps.need("ray.serve", "--ray serving")
    try:
        _start(serve, config.host, port, config.request_timeout + 5)
        host, port = _proxy_address(config.host, port, given=bool(config.port))
        _run(serve, config, options)
        log.info("listening", extra={"fields": {
            "url": f"http://{host}:{port}", "models": [m.name for m in config.models],
            "ray": True, "replicas": options.replicas,
            "autoscale": [options.min_replicas, options.max_replicas]
            if options.replicas is None else None, "pid": os.getpid()}})
        clean = _wait_and_drain(serve, config)
    finally:
        if local:  # on a cluster, its Serve (and other applications) keep running
            serve.shutdown()
        ray.shutdown()  # a local Ray stops; a cluster's driver disconnects
    log.info("stopped", extra={"fields": {"clean": clean}})
    return 0 if clean else 1


def _check_bundles(config: ServeConfig) -> None:
    """Open every bundle's manifest here first: a bad path or bundle is a clear error (exit
    2) rather than replicas failing in Ray's retries; every node must hold the same path."""
    from angle_rt.encoder import locate_bundle
    from angle_rt.manifest import read_manifest

    for spec in config.models:
        read_manifest(locate_bundle(spec.path)[0])


def _run(serve: Any, config: ServeConfig, options: RayServeOptions) -> None:
    try:
        serve.run(application(config, options), name=DEPLOYMENT, route_prefix="/")
    except RuntimeError as exc:  # Ray's deploy failure: replicas that could not start
        raise AngleRTError(f"the Ray Serve deployment failed to start: {exc}") from None


def _wait_and_drain(serve: Any, config: ServeConfig) -> bool:
    """Block until a signal; delete the application (blocking: Ray stops routing to it and
    waits up to graceful_shutdown_timeout_s for each replica's requests); a second signal
    exits at once. Whether it finished within the timeout."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("draining", extra={"fields": {"ray": True}})

    def force(*_: Any) -> None:
        log.warning("second signal: exiting without waiting for requests in flight")
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, force)
    start = time.monotonic()
    serve.delete(DEPLOYMENT)
    took = time.monotonic() - start
    return took < config.graceful_timeout


def _start(serve: Any, host: str, port: int, request_timeout_s: float) -> None:
    try:
        serve.start(http_options={"host": host, "port": port,
                                  "request_timeout_s": request_timeout_s})
    except Exception as exc:  # RayTaskError from the proxy actor, with its traceback
        if "Failed to bind" not in str(exc):
            raise
        raise OSError(f"Ray Serve's proxy cannot listen on {host}:{port}: address in use "
                      "(or not this node's)") from None


def _proxy_address(host: str, port: int, given: bool) -> tuple[str, int]:
    """Where Serve's proxy listens. On a cluster where Serve runs already, serve.start keeps
    its HTTP options and only logs that ours are ignored, so the URL logged was wrong. A
    --port other than the running proxy's is refused (nothing deployed); without --port,
    the proxy's own is taken."""
    try:  # a private API: without it, trust what was asked
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        running = (str(http.host), int(http.port))
    except Exception:
        return host, port
    if given and running[1] != port:
        raise OSError(f"Ray Serve already runs on this cluster with its proxy on "
                      f"{running[0]}:{running[1]}, which cannot change while it runs: pass "
                      f"--port {running[1]} (or stop that Serve first)")
    return running


def _free_port(host: str, port: int = 0) -> int:
    """`port` if it can be bound on `host` now (0: a free one); OSError naming it else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        return sock.getsockname()[1]
