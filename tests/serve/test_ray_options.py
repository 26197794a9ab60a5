"""`angle-rt serve --ray` without starting Ray: the flags, the deployment's options, what each
replica runs and its health check, and the app's behaviour behind Ray's proxy."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from angle_rt.cli import build_parser, main
from angle_rt.serve.app import ServerState
from angle_rt.serve.config import ModelSpec, ServeConfig, config_from_args
from angle_rt.serve.metrics import Metrics
from angle_rt.serve.ray_serve import Replica, ray_options


def _args(*argv: str):
    return build_parser().parse_args(["serve", "b", *argv])


@pytest.mark.parametrize(("argv", "problem"), [
    (("--ray-replicas", "4"), "--ray-replicas only apply with --ray"),
    (("--ray-cpus-per-replica", "2", "--ray-autoscale", "1:2"),
     "--ray-autoscale, --ray-cpus-per-replica only apply with --ray"),
    (("--ray", "--ray-replicas", "3", "--ray-autoscale", "2:5"), "exclude each other"),
    (("--ray", "--ray-target-ongoing", "8"), "give --ray-autoscale"),
    (("--ray", "--ray-autoscale", "5:2"), "0 < MIN ≤ MAX"),
])
def test_ray_flags_that_would_do_nothing_are_refused(argv, problem):
    """They were dropped silently (4 replicas asked, one process served)."""
    with pytest.raises(ValueError, match=problem):
        ray_options(_args(*argv))


def test_flags_make_the_deployment_options():
    assert ray_options(_args()) is None
    opts = ray_options(_args("--ray", "--ray-autoscale", "2:6", "--ray-target-ongoing", "8",
                             "--ray-cpus-per-replica", "2.5"))
    config = ServeConfig(models=[], max_concurrent_requests=100, graceful_timeout=12)
    got = opts.deployment_options(config)
    assert got["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6,
                                         "target_ongoing_requests": 8.0}
    assert "num_replicas" not in got and got["ray_actor_options"]["num_cpus"] == 2.5
    assert got["graceful_shutdown_timeout_s"] == 12
    # Ray holds back past max_ongoing_requests: above the app's limit, so its JSON 429
    # answers the excess (at the limit it never fired and requests queued without bound)
    assert got["max_ongoing_requests"] > config.max_concurrent_requests
    assert got["max_queued_requests"] == 100
    assert got["backpressure_config"]["status_code"] == 429
    fixed = ray_options(_args("--ray", "--ray-replicas", "3")).deployment_options(config)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed


def test_a_replica_runs_one_worker_on_its_cpus_with_absolute_paths(tiny_bert_bundle,
                                                                   monkeypatch):
    """The Encoder's CPU default counts the node's cores, not the replica's share: 8
    replicas of 1 CPU on a 64-core node ran 512 ONNX Runtime workers. Paths are resolved
    where the command ran (a replica's working directory is Ray's)."""
    monkeypatch.chdir(tiny_bert_bundle.parent)
    config = config_from_args(_args("--ray", "--ray-cpus-per-replica", "2.5"))
    config.models = [ModelSpec("tiny", type(tiny_bert_bundle)(tiny_bert_bundle.name))]
    replica = ray_options(_args("--ray", "--ray-cpus-per-replica", "2.5")).replica_config(
        config)
    assert (replica.threads, replica.workers) == (math.ceil(2.5), 1)
    assert replica.models[0].path == tiny_bert_bundle.resolve()
    assert replica.request_id_header is False  # Ray's proxy sets x-request-id
    given = config_from_args(_args("--ray", "--threads", "1", "--workers", "2"))
    kept = ray_options(_args("--ray")).replica_config(given)
    assert (kept.threads, kept.workers) == (1, 2)


def test_the_replica_health_check_judges_as_health_does(tiny_bert_bundle, monkeypatch):
    """It looked only for dead or stuck workers: a replica whose warm-up failed, or whose
    backend fails every batch, stayed in rotation."""
    config = ServeConfig(models=[ModelSpec("tiny", tiny_bert_bundle)], threads=1, workers=1,
                         access_log=False)
    replica = Replica(config)
    try:
        asyncio.run(replica.check_health())  # healthy: the probe embeds
        model = replica.state.models["tiny"]

        def broken(*args, **kwargs):
            raise RuntimeError("backend lost")

        monkeypatch.setattr(model.batcher, "_run_batch", broken)
        deadline = time.monotonic() + 10  # the first probe's worker may still be finishing
        while not model.batcher.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        model.batcher.last_ok = None  # no recent success vouches for it: a probe runs
        with pytest.raises(RuntimeError, match="tiny: a probe failed"):
            asyncio.run(replica.check_health())
        replica.state.warmup_error = "RuntimeError: backend lost"
        with pytest.raises(RuntimeError, match="warm-up failed"):
            asyncio.run(replica.check_health())
    finally:
        for m in replica.state.models.values():
            m.close()


def test_a_missing_bundle_fails_before_ray_starts(tmp_path, capsys):
    """It failed inside each replica (Ray retried 20 times) and ended in a traceback."""
    pytest.importorskip("ray.serve")
    assert main(["serve", str(tmp_path / "nowhere"), "--ray"]) == 2
    assert "nowhere" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()



def test_a_port_in_use_fails_before_ray_starts(tiny_bert_bundle, capsys):
    """Ray Serve's proxy failed to bind inside its actor: a RayTaskError traceback after Ray
    had started, exit 1. Now, as without --ray, one line naming the address, exit 2."""
    pytest.importorskip("ray.serve")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_bert_bundle), "--ray", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "in use" in err and "Traceback" not in err
    import ray

    assert not ray.is_initialized()

def test_a_port_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "b", "--port", "70000"])
    assert exc.value.code == 2 and "0…65535" in capsys.readouterr().err


def test_behind_ray_the_app_adds_no_request_id_of_its_own(tiny_bert_bundle):
    """Ray's proxy sets X-Request-ID: the response carried two (different ones for a client
    id past 64 characters, which the app cuts)."""
    from starlette.testclient import TestClient

    from angle_rt.serve.app import build_app
    from angle_rt.serve.server import open_models

    for echo in (True, False):
        config = ServeConfig(models=[ModelSpec("tiny", tiny_bert_bundle)], threads=1,
                             workers=1, access_log=False, request_id_header=echo)
        metrics = Metrics()
        state = ServerState(open_models(config, metrics), config, metrics)
        with TestClient(build_app(state)) as client:
            r = client.get("/health", headers={"x-request-id": "r" * 80})
        assert r.status_code == 200
        assert ("x-request-id" in r.headers) is echo
