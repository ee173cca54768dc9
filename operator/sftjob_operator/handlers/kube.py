# mypy: disable-error-code="arg-type,no-untyped-call,assignment"
"""All Kubernetes API calls of the operator (sync kubernetes client; called from worker threads).

API verbs used here (the Helm chart's ClusterRole must grant them):
  sft.tuning.dev  sftjobs            get, delete (ttlPolicy DeleteSFTJob); list, watch, patch (kopf)
  sft.tuning.dev  sftjobs/status     patch
  sft.tuning.dev  sftjobs/finalizers update (ownerReferences with blockOwnerDeletion)
  batch           jobs               create, get (whose it is, after a 409), patch (suspend), delete (TTL);
                                     list, watch (kopf index)
  ""              pods               list, watch (kopf index)
  ""              services           create, get (whose it is, after a 409 and before TTL), delete (TTL)
  ""              events             create; list (stuck detection: FailedCreate on a Job)
  networking.k8s.io networkpolicies  create, get (whose it is, after a 409) (only with a network policy:
                                     the chart's networkPolicy.enabled; deleted with the SFTJob by the GC)
  kopf.dev        kopfpeerings / clusterkopfpeerings  get, list, watch, patch (kopf peering)
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime
from typing import Any

import pydantic
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sftjob_api import GROUP, PLURAL, VERSION, SFTJobStatus

from ..render.bad_nodes import node_problem
from ..render.names import LABEL_JOB_NAME, LABEL_STAGE
from ..render.ownership import Existing, classify, conflict_message
from ..render.rejected import REJECTED_STATUSES, rejection_message, validation_message
from ..render.status import status_patch

log = logging.getLogger("sftjob_operator.kube")
Obj = dict[str, Any]
COMPONENT = "sftjob-operator"


class ChildRejected(Exception):
    """The apiserver refused a child object as invalid (400/422): the spec's fault, never retried."""


class ChildConflict(Exception):
    """A child's name is taken by an object this SFTJob does not own (render/ownership.py): never adopted,
    patched or deleted; the run fails naming it."""


class ChildNotYet(Exception):
    """A child's name is still held by an earlier SFTJob's object of the same name (the garbage collector has
    not removed it yet): create again on a later reconcile."""


def new_api_client(kubeconfig: str | None, pool_size: int) -> client.ApiClient:
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    cfg.retries = urllib3.Retry(
        total=3, connect=3, read=2, backoff_factor=0.2, status_forcelist=(), allowed_methods=None
    )
    return client.ApiClient(cfg)


class Kube:
    """Thin, typed-enough wrapper; every call has a request timeout."""

    def __init__(self, api: client.ApiClient, request_timeout: float):
        self.api = api
        self.timeout = request_timeout
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.nodes_forbidden = False  # a 403 reading nodes turns the node check off (node_problem)

    # ---- SFTJobs -------------------------------------------------------------------------------------------

    def get_sftjob(self, namespace: str, name: str) -> Obj | None:
        try:
            obj: Obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout
            )
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def write_status(self, sftjob: Obj, status: SFTJobStatus) -> Obj:
        """The one status write path (reconcile, progress reader, bookkeeping after the end): the top-level
        keys of `status` that differ from `sftjob`'s stored status, merge-patched with `sftjob`'s
        resourceVersion as precondition, so a write from a stale view fails with 409 (the caller re-reads).
        Returns the SFTJob as written (`sftjob` itself when nothing changed), for the next write to chain on.
        """
        patch = status_patch(sftjob.get("status"), status)
        if not patch:
            return sftjob
        meta = sftjob["metadata"]
        body: Obj = {"status": patch, "metadata": {"resourceVersion": meta["resourceVersion"]}}
        out: Obj = self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            meta["namespace"],
            PLURAL,
            meta["name"],
            body,
            _request_timeout=self.timeout,
            _content_type="application/merge-patch+json",
        )
        return out

    def delete_sftjob(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                _request_timeout=self.timeout,
                body=client.V1DeleteOptions(
                    propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid)
                ),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # ---- children ------------------------------------------------------------------------------------------

    def create(self, obj: Obj) -> bool:
        """Create a child; False when it already exists (idempotent re-creation after a restart)."""
        kind = obj["kind"]
        ns = obj["metadata"]["namespace"]
        stage = obj["metadata"].get("labels", {}).get(LABEL_STAGE, "")
        label = f"{stage} {kind}" if stage else kind
        try:
            if kind == "Service":
                self.core.create_namespaced_service(ns, obj, _request_timeout=self.timeout)
            elif kind == "Job":
                self.batch.create_namespaced_job(ns, obj, _request_timeout=self.timeout)
            elif kind == "NetworkPolicy":
                self.networking.create_namespaced_network_policy(ns, obj, _request_timeout=self.timeout)
            else:
                raise ValueError(f"cannot create {kind}")
        except ApiException as e:
            if e.status == 409:
                return self._existing(obj, label)
            if e.status in REJECTED_STATUSES:
                raise ChildRejected(
                    rejection_message(label, obj["metadata"]["name"], e.status, e.body)
                ) from e
            raise
        except pydantic.ValidationError as e:  # the client's own core/v1 models refused it before sending
            raise ChildRejected(validation_message(label, obj["metadata"]["name"], list(e.errors()))) from e
        return True

    def _existing(self, obj: Obj, label: str) -> bool:
        """After a 409: False (it is ours already) only when the existing object's ownerReference is this
        SFTJob's uid; otherwise ChildNotYet or ChildConflict."""
        meta = obj["metadata"]
        owner = next(o for o in meta["ownerReferences"] if o.get("controller"))
        read = {
            "Service": self.core.read_namespaced_service,
            "NetworkPolicy": self.networking.read_namespaced_network_policy,
        }.get(obj["kind"], self.batch.read_namespaced_job)
        try:
            existing = self.api.sanitize_for_serialization(
                read(meta["name"], meta["namespace"], _request_timeout=self.timeout)
            )
        except ApiException as e:
            if e.status == 404:  # gone between the create and the read: the next reconcile creates it
                raise ChildNotYet(f"{label} {meta['name']} was just deleted") from e
            raise
        verdict = classify(existing, owner["name"], owner["uid"])
        if verdict == Existing.MINE:
            return False
        if verdict == Existing.LEFTOVER:
            raise ChildNotYet(f"{label} {meta['name']} of an earlier SFTJob {owner['name']} is still there")
        raise ChildConflict(conflict_message(label, meta["namespace"], meta["name"], existing))

    def api_server_ip(self) -> str | None:
        """The API server's address as this client reaches it, when it is an IP (in a pod: the `kubernetes`
        Service's ClusterIP): trainer egress excludes it (render/network_policy.py)."""
        host = urllib3.util.parse_url(self.api.configuration.host).host or ""
        try:
            return str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            return None

    def list_children(self, namespace: str, sftjob: str) -> tuple[list[Obj], list[Obj]]:
        """The child Jobs and Pods of one SFTJob as the API has them now (the watch caches may lag)."""
        selector = f"{LABEL_JOB_NAME}={sftjob}"
        jobs = self.batch.list_namespaced_job(
            namespace, label_selector=selector, _request_timeout=self.timeout
        )
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=self.timeout
        )
        plain = self.api.sanitize_for_serialization
        return [plain(j) for j in jobs.items], [plain(p) for p in pods.items]

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        try:
            self.batch.patch_namespaced_job(
                name, namespace, {"spec": {"suspend": suspend}}, _request_timeout=self.timeout
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def set_job_label(self, namespace: str, name: str, key: str, value: str) -> None:
        try:
            self.batch.patch_namespaced_job(
                name, namespace, {"metadata": {"labels": {key: value}}}, _request_timeout=self.timeout
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def open_pod_gate(self, namespace: str, name: str, gate: str, annotations: dict[str, str]) -> None:
        """Set `annotations` on a pod and remove its scheduling gate `gate` in one write (render/admission.py:
        its container's env reads them, and no container exists before the pod is scheduled). Other gates
        stay; a pod gone, or changed since it was read (409), is left to the next reconcile."""
        try:
            pod = self.api.sanitize_for_serialization(
                self.core.read_namespaced_pod(name, namespace, _request_timeout=self.timeout)
            )
            gates = [g["name"] for g in (pod.get("spec") or {}).get("schedulingGates") or []]
            if gate not in gates:
                return
            body = {
                "metadata": {
                    "annotations": annotations,
                    "resourceVersion": pod["metadata"]["resourceVersion"],
                },
                "spec": {"schedulingGates": [{"name": g} for g in gates if g != gate]},
            }
            self.core.patch_namespaced_pod(
                name,
                namespace,
                body,
                _request_timeout=self.timeout,
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete this very Job (uid precondition: never a newer one of the same name); foreground, so the Job
        object goes only after its pods are gone and a re-created group never overlaps the old one."""
        opts = client.V1DeleteOptions(
            propagation_policy="Foreground", preconditions=client.V1Preconditions(uid=uid)
        )
        try:
            self.batch.delete_namespaced_job(name, namespace, body=opts, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status not in (404, 409):  # gone already / a different Job by now
                raise

    def set_workloads_active(
        self, namespace: str, label: str, value: str, active: bool, api: tuple[str, str, str]
    ) -> int:
        """Patch spec.active of the Kueue Workloads labelled label=value; how many there were (0 also when
        the Workload API is not installed)."""
        group, version, plural = api
        try:
            found: Obj = self.custom.list_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                label_selector=f"{label}={value}",
                _request_timeout=self.timeout,
            )
        except ApiException as e:
            if e.status == 404:
                return 0
            raise
        items: list[Obj] = found.get("items") or []
        for wl in items:
            if (wl.get("spec") or {}).get("active", True) == active:
                continue
            self.custom.patch_namespaced_custom_object(
                group, version, namespace, plural, wl["metadata"]["name"], {"spec": {"active": active}},
                _request_timeout=self.timeout,
            )  # fmt: skip
        return len(items)

    def node_problem(self, name: str) -> str | None:
        """Why no rank should run on this node now (NotReady, gone: render/bad_nodes.py); None when it is
        Ready or cannot be read (no RBAC for nodes: the node check is then off, logged once)."""
        try:
            node = self.core.read_node(name, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return node_problem(None)
            if e.status == 403:
                if not self.nodes_forbidden:
                    log.warning("cannot read nodes (403): NotReady nodes under training pods go unnoticed")
                self.nodes_forbidden = True
                return None
            raise
        return node_problem(self.api.sanitize_for_serialization(node))

    def force_delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod on a NotReady or gone node at once (grace 0): no kubelet will confirm its end."""
        opts = client.V1DeleteOptions(grace_period_seconds=0)
        try:
            self.core.delete_namespaced_pod(name, namespace, body=opts, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def delete_children(
        self, namespace: str, jobs: list[tuple[str, str]], services: list[str], uid: str
    ) -> None:
        """TTL clean-up: the given (name, uid) stage Jobs and the Services (if the run has any), each only if it
        is still that very object and this SFTJob's (uid preconditions: an object someone else made under a
        child's name is never deleted). (The ConfigMap that earlier versions created goes with the SFTJob.)"""

        def opts(child_uid: str) -> client.V1DeleteOptions:
            return client.V1DeleteOptions(
                propagation_policy="Background", preconditions=client.V1Preconditions(uid=child_uid)
            )

        calls = [(self.batch.delete_namespaced_job, name, job_uid) for name, job_uid in jobs]
        for service in services:
            try:
                svc = self.core.read_namespaced_service(service, namespace, _request_timeout=self.timeout)
            except ApiException as e:
                if e.status != 404:
                    raise
            else:
                plain = self.api.sanitize_for_serialization(svc)
                if classify(plain, "", uid) == Existing.MINE:
                    calls.append((self.core.delete_namespaced_service, service, plain["metadata"]["uid"]))
                else:
                    log.warning("TTL: Service %s/%s is not this SFTJob's; left alone", namespace, service)
        for fn, name, child_uid in calls:
            try:
                fn(name, namespace, body=opts(child_uid), _request_timeout=self.timeout)
            except ApiException as e:
                if e.status not in (404, 409):  # gone / a different object of that name by now
                    raise

    def job_warning_events(self, namespace: str, job_name: str) -> list[Obj]:
        out = self.core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind=Job,involvedObject.name={job_name},type=Warning",
            _request_timeout=self.timeout,
            limit=50,
        )
        return [self.api.sanitize_for_serialization(e) for e in out.items]

    # ---- events --------------------------------------------------------------------------------------------

    def post_event(self, sftjob: Obj, event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the SFTJob; failures are logged, never raised (events are best effort)."""
        meta = sftjob.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "SFTJob",
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta.get("namespace"), body, _request_timeout=self.timeout)
        except Exception as e:  # best effort
            log.warning(
                "could not post event %s on %s/%s: %s", reason, meta.get("namespace"), meta.get("name"), e
            )
