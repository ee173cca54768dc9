"""Operator settings from the environment and command-line flags (flags win)."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftjob_api.policy import parse_policy

from .render.network_policy import NetworkPolicyOptions
from .render.objects import METRICS_PORT, RenderOptions

ENV_PREFIX = "SFTJOB_"
# Environment variables (the Helm chart sets these): SFTJOB_NAMESPACES, SFTJOB_TRAINER_IMAGE,
# SFTJOB_TRAINER_SERVICE_ACCOUNT, SFTJOB_PROGRESS_INTERVAL, SFTJOB_WATCH_TIMEOUT, SFTJOB_REQUEST_TIMEOUT,
# SFTJOB_FINALIZER, SFTJOB_USE_FINALIZER, SFTJOB_METRICS_PORT, SFTJOB_HEALTH_PORT, SFTJOB_PEERING (peering
# name; empty: standalone), SFTJOB_NETWORK_POLICY (JSON, render/network_policy.py; unset: none),
# SFTJOB_ADMISSION_POLICY (JSON, sftjob_api/policy.py; unset: none), SFTJOB_PRIORITY, SFTJOB_WORKERS, SFTJOB_LOG_LEVEL, SFTJOB_KUBECONFIG.


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    default_image: str = RenderOptions.default_image
    trainer_service_account: str | None = None  # pods' ServiceAccount when spec.resources leaves it unset
    image_pull_policy: str = "IfNotPresent"
    trainer_metrics_port: int = METRICS_PORT
    watch_server_timeout: int = 300  # seconds the API server keeps one watch open
    watch_client_timeout: int = 330
    request_timeout: int = 30
    finalizer: str = "sft.tuning.dev/finalizer"
    use_finalizer: bool = False  # add a finalizer so deletion waits for the operator's clean-up
    metrics_port: int = 8080  # operator /metrics (0: off)
    metrics_address: str = "0.0.0.0"
    health_address: str = "0.0.0.0"
    health_port: int = 8081  # kopf liveness endpoint /healthz (0: off)
    progress_interval: float = 15.0  # timer: progress, stuck detection, TTL, resync
    progress_timeout: float = 3.0  # the whole read of a trainer's /metrics (connect to last byte)
    peering_name: str = "sftjob-operator"
    standalone: bool = False  # no peering: for one replica or tests
    peering_required: bool = (
        False  # a peering name was given: without the peering CRDs, wait (never run twice)
    )
    priority: int = 0  # peering priority: the highest is active, others pause
    workers: int = 8  # threads doing Kubernetes I/O
    kubeconfig: str | None = None
    log_level: str = "INFO"
    annotation_prefix: str = "sft.tuning.dev"
    network_policy: NetworkPolicyOptions | None = None  # a NetworkPolicy per SFTJob (None: none)
    admission_policy: Mapping[str, Any] | None = None  # the admin policy checked before children (None: none)
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def render_options(self) -> RenderOptions:
        return RenderOptions(
            default_image=self.default_image,
            metrics_port=self.trainer_metrics_port,
            image_pull_policy=self.image_pull_policy,
            default_service_account=self.trainer_service_account or None,
        )


def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return env.get(ENV_PREFIX + name, default)


def _bool(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    e = os.environ if env is None else env
    d = Settings()

    def ev(name: str, default: object) -> str:
        v = _env(e, name)
        return str(default) if v is None else v

    p = argparse.ArgumentParser(
        prog="sftjob-operator",
        description="Run the SFTJob operator. Flags override the SFTJOB_* environment variables.",
    )
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        help="namespace to watch (repeat, or comma-separated; env NAMESPACES); default all",
    )
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    p.add_argument(
        "--default-image",
        "--trainer-image",
        dest="default_image",
        default=_env(e, "TRAINER_IMAGE") or ev("DEFAULT_IMAGE", d.default_image),
        help="trainer image for SFTJobs without spec.resources.image (env TRAINER_IMAGE)",
    )
    p.add_argument(
        "--trainer-service-account",
        default=_env(e, "TRAINER_SERVICE_ACCOUNT") or None,
        help="ServiceAccount of trainer pods without spec.resources.serviceAccountName",
    )
    p.add_argument("--image-pull-policy", default=ev("IMAGE_PULL_POLICY", d.image_pull_policy))
    p.add_argument(
        "--trainer-metrics-port", type=int, default=int(ev("TRAINER_METRICS_PORT", d.trainer_metrics_port))
    )
    p.add_argument(
        "--watch-timeout",
        dest="watch_server_timeout",
        type=int,
        default=int(ev("WATCH_TIMEOUT", d.watch_server_timeout)),
        help="seconds the API server keeps a watch open (the client waits 30 s longer)",
    )
    p.add_argument("--request-timeout", type=int, default=int(ev("REQUEST_TIMEOUT", d.request_timeout)))
    p.add_argument("--finalizer", default=ev("FINALIZER", d.finalizer))
    p.add_argument("--use-finalizer", action="store_true", default=_bool(_env(e, "USE_FINALIZER")))
    p.add_argument("--metrics-port", type=int, default=int(ev("METRICS_PORT", d.metrics_port)))
    p.add_argument("--metrics-address", default=ev("METRICS_ADDRESS", d.metrics_address))
    p.add_argument("--health-port", type=int, default=int(ev("HEALTH_PORT", d.health_port)))
    p.add_argument("--health-address", default=ev("HEALTH_ADDRESS", d.health_address))
    p.add_argument(
        "--progress-interval", type=float, default=float(ev("PROGRESS_INTERVAL", d.progress_interval))
    )
    p.add_argument(
        "--progress-timeout", type=float, default=float(ev("PROGRESS_TIMEOUT", d.progress_timeout))
    )
    peering_env = _env(e, "PEERING")
    p.add_argument(
        "--peering-name",
        default=peering_env or None,
        help="kopf peering name: replicas with the same name elect one active (env PEERING)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        default=_bool(_env(e, "STANDALONE")) or peering_env == "",
        help="no peering (one replica); SFTJOB_PEERING set but empty means the same",
    )
    priority_env = _env(e, "PRIORITY")
    p.add_argument(
        "--priority",
        type=int,
        default=int(priority_env) if priority_env else None,
        help="kopf peering priority (env PRIORITY); default: each replica draws its own at start",
    )
    p.add_argument(
        "--network-policy",
        default=_env(e, "NETWORK_POLICY") or None,
        help="JSON settings of the NetworkPolicy created per SFTJob ('{}': defaults; unset: no policy)",
    )
    p.add_argument(
        "--admission-policy",
        default=_env(e, "ADMISSION_POLICY") or None,
        help="JSON admin policy (sftjob_api/policy.py) checked before creating children (unset: none)",
    )
    p.add_argument("--workers", type=int, default=int(ev("WORKERS", d.workers)))
    p.add_argument("--kubeconfig", default=_env(e, "KUBECONFIG"))
    p.add_argument("--log-level", default=ev("LOG_LEVEL", d.log_level))
    return p


def draw_priority() -> int:
    """A peering priority for a replica started without one. kopf pauses *every* replica while two share a
    priority ("Pausing all operators, including self"), and the chart starts its replicas with the same
    flags: each draws its own, so exactly one (the highest) is active and the others stand by."""
    return random.SystemRandom().randint(1, 2**31 - 1)


def from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    e = os.environ if env is None else env
    args = parser(e).parse_args(list(argv) if argv is not None else None)
    raw: list[str] = args.namespaces or []
    if not raw and _env(e, "NAMESPACES"):
        raw = [str(_env(e, "NAMESPACES"))]
    namespaces = tuple(n.strip() for chunk in raw for n in chunk.split(",") if n.strip())
    if args.all_namespaces:
        namespaces = ()
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.progress_interval <= 0:
        raise SystemExit("--progress-interval must be > 0")
    if args.progress_timeout <= 0:
        raise SystemExit("--progress-timeout must be > 0")
    return Settings(
        namespaces=namespaces,
        default_image=args.default_image,
        image_pull_policy=args.image_pull_policy,
        trainer_metrics_port=args.trainer_metrics_port,
        watch_server_timeout=args.watch_server_timeout,
        watch_client_timeout=args.watch_server_timeout + 30,
        trainer_service_account=args.trainer_service_account,
        request_timeout=args.request_timeout,
        finalizer=args.finalizer,
        use_finalizer=args.use_finalizer,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        health_port=args.health_port,
        health_address=args.health_address,
        progress_interval=args.progress_interval,
        progress_timeout=args.progress_timeout,
        peering_name=args.peering_name or Settings.peering_name,
        standalone=args.standalone,
        peering_required=bool(args.peering_name) and not args.standalone,
        priority=args.priority if args.priority is not None else draw_priority(),
        workers=args.workers,
        kubeconfig=args.kubeconfig,
        log_level=args.log_level,
        network_policy=_network_policy(args.network_policy),
        admission_policy=_admission_policy(args.admission_policy),
    )


def _network_policy(text: str | None) -> NetworkPolicyOptions | None:
    if not text:
        return None
    try:
        return NetworkPolicyOptions.from_json(text)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--network-policy: {e}") from e


def _admission_policy(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        return parse_policy(text)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--admission-policy: {e}") from e
