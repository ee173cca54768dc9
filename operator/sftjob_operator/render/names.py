"""Deterministic names and labels of everything the operator creates for one SFTJob."""

from __future__ import annotations

from dataclasses import dataclass

from sftjob_api import API_VERSION, GROUP, KIND, Stage

LABEL_JOB_NAME = f"{GROUP}/job-name"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "sftjob-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)
# Set by the Job controller on every pod of an Indexed Job (also exported as JOB_COMPLETION_INDEX).
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# On the train Job: the group's shape it was rendered at, or its size as Kueue admitted it (render/admission.py);
# render/elastic.py compares it with the wanted one.
LABEL_NODES = f"{GROUP}/nodes"
LABEL_GPUS_PER_NODE = f"{GROUP}/gpus-per-node"
# A Kueue-sized elastic group (render/admission.py): Kueue's partial admission of a batch/v1 Job, our
# scheduling gate on its pods and the annotation that gives each pod the group's size (--nnodes).
KUEUE_MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"
KUEUE_COMPLETIONS_EQUAL_PARALLELISM = "kueue.x-k8s.io/job-completions-equal-parallelism"
GROUP_SIZE_GATE = f"{GROUP}/group-size"
NNODES_ANNOTATION = f"{GROUP}/nnodes"
# The stage label of an elastic run's capacity probe (render/elastic.py): not a stage of the run.
PROBE = "probe"


@dataclass(frozen=True)
class ChildNames:
    """Names of the children of SFTJob `name`; identical on every reconcile, so creation is idempotent."""

    name: str

    @property
    def service(self) -> str:
        """The training group's headless Service (status.children.service)."""
        return self.service_of(Stage.TRAIN)

    def service_of(self, stage: Stage) -> str:
        """A group stage's headless Service in a multi-node run, named like its Job: it is the pods'
        subdomain, so <name>-<stage>-<index>.<name>-<stage> resolves (<name>-train, <name>-align)."""
        return self.job(stage)

    @property
    def network_policy(self) -> str:
        return f"{self.name}-network"

    @property
    def curate_job(self) -> str:
        return self.job(Stage.CURATE)

    @property
    def train_job(self) -> str:
        return self.job(Stage.TRAIN)

    @property
    def eval_job(self) -> str:
        return self.job(Stage.EVAL)

    @property
    def merge_job(self) -> str:
        return self.job(Stage.MERGE)

    @property
    def probe_job(self) -> str:
        return f"{self.name}-probe"

    def job(self, stage: Stage) -> str:
        """`<name>-<stage>`: every stage's Job (sftjob_api.stage_table)."""
        return f"{self.name}-{stage}"

    @property
    def master_addr(self) -> str:
        return self.master_addr_of(Stage.TRAIN)

    def master_addr_of(self, stage: Stage) -> str:
        """Stable DNS name of a group stage's rank 0 (pod hostname = <job>-<index>, subdomain = its Service)."""
        return f"{self.job(stage)}-0.{self.service_of(stage)}"


def labels(name: str, stage: str) -> dict[str, str]:
    return {
        LABEL_JOB_NAME: name,
        LABEL_STAGE: stage,
        LABEL_MANAGED_BY: MANAGED_BY,
        "app.kubernetes.io/name": "sftjob",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": stage,
    }


def owner_reference(name: str, uid: str) -> dict[str, object]:
    """The SFTJob as controlling owner: the garbage collector deletes children with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
