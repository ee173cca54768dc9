"""`SFTJob.spec`: what the user asks for. The CRD schema is generated from these models.

Every field's docstring becomes its description in the CRD (`kubectl explain sftjob.spec...`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .alignment import ALIGN_LR_DIVISOR, EPOCHS_XOR_MAX_STEPS, AlignmentSpec
from .base import ApiModel, CelRule
from .dataset import DATA_URI, DatasetSpec
from .evaluation import PREFERENCE_GATES, EvalSpec
from .pod_strings import module_names_rule
from .resources_spec import ResourcesSpec
from .run_policy import RunPolicy
from .serving import Server
from .serving import cel_rules as serving_rules
from .tracking import TrackingSpec

# A model-cache name (the trainer's model cache resolves it to a directory).
CACHE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MODEL_URI = DATA_URI[:-2] + "|" + CACHE_NAME + ")$"
OUTPUT_URI = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|/.*|\./.*|[A-Za-z0-9_][A-Za-z0-9._/-]*)$"
Dtype = Literal["bfloat16", "float16", "float32"]


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    uri: str = Field(pattern=MODEL_URI, max_length=1024)
    """Base model: s3://bucket/prefix, an absolute path (e.g. on a mounted PVC), pvc://claim/path, or a
    name resolved from the operator's model cache (e.g. smollm2-135m-instruct)."""
    revision: str | None = Field(default=None, max_length=128)
    """Revision (tag or commit) of the model, recorded in the artifact manifest."""
    tokenizer: str | None = Field(default=None, pattern=MODEL_URI, max_length=1024)
    """Tokenizer location when it differs from the model's."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run. Off by default: it executes arbitrary code."""


class LoraSpec(ApiModel):
    """LoRA adapter settings (used by the lora and qlora methods)."""

    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the adapter matrices."""
    alpha: int = Field(default=32, ge=1, le=4096)
    """Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, max_length=64
    )
    """Module names to adapt, or ["all-linear"] for every linear layer except the output head."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=16)
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens); vLLM and TGI cannot
    load such adapters (docs/serving.md)."""

    cel_rules = (
        module_names_rule("targetModules", "method.lora.targetModules"),
        module_names_rule("modulesToSave", "method.lora.modulesToSave"),
    )


class QuantizationSpec(ApiModel):
    """bitsandbytes 4-bit quantization of the frozen base weights (QLoRA)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; nf4 is the QLoRA paper's choice."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Dtype = "bfloat16"
    """dtype of the matmuls; the trainer uses float32 when no GPU is present."""


class MethodSpec(ApiModel):
    """How the model is adapted."""

    type: Literal["qlora", "lora", "full"] = "qlora"
    """qlora: 4-bit frozen base + LoRA; lora: full-precision frozen base + LoRA; full: all weights."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter settings (ignored by full)."""
    quantization: QuantizationSpec | None = None
    """Quantization settings; only valid with qlora (defaults apply when unset)."""

    cel_rules = (
        CelRule(
            cel="!has(self.quantization) || self.type == 'qlora'",
            message="quantization is only valid with type qlora",
            check=lambda m: m.quantization is None or m.type == "qlora",
            field_path=".quantization",
        ),
    )


class TrainingSpec(ApiModel):
    """Optimisation hyperparameters."""

    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the training data (default 1 when maxSteps is unset)."""
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Optimizer steps to run; exclusive with epochs."""
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    """Peak learning rate."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(default=0.03, ge=0, le=0.5)
    """Fraction of total steps spent warming up linearly from 0."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000)
    """Gradient clipping norm."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """adamw_8bit uses bitsandbytes' 8-bit optimizer state."""
    global_batch_size: int = Field(default=16, ge=1, le=65536)
    """Samples (packed rows when packing) per optimizer step across all ranks."""
    micro_batch_size: int = Field(default=4, ge=1, le=4096)
    """Samples per rank per forward pass; gradient accumulation = global / (micro x world size)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass instead of keeping them (saves memory)."""
    checkpointing_policy: Literal["selective", "full"] = "selective"
    """With gradient checkpointing: selective keeps matmul and attention outputs and recomputes the cheap
    ops (norms, activations, dropout); full recomputes whole layers (least memory, ~1.5x the compute)."""
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    """Seed for data order, split, adapter init and dropout."""
    checkpoint_steps: int = Field(default=100, ge=1, le=10_000_000)
    """Save a resumable checkpoint every N optimizer steps (and on SIGTERM)."""
    neftune_alpha: float | None = Field(default=None, gt=0, le=100)
    """NEFTune: add uniform noise of this scale to input embeddings during training."""
    resume_from: str | None = Field(default=None, pattern=OUTPUT_URI, max_length=1024)
    """Warm start (lora, qlora): the adapter weights of this checkpoint (`.../checkpoints/<run>/step-N/`) or
    adapter directory (`.../adapter/`), also another run's; training then starts at step 0 of this spec with
    a fresh optimizer. Used only while the run has no checkpoint of its own (docs/recovery.md)."""

    cel_rules = (
        EPOCHS_XOR_MAX_STEPS,
        CelRule(
            cel="self.globalBatchSize % self.microBatchSize == 0",
            message="globalBatchSize must be a multiple of microBatchSize",
            check=lambda t: t.global_batch_size % t.micro_batch_size == 0,
            field_path=".microBatchSize",
        ),
    )


Object = dict[str, Any]

# CEL: an alignment.training setting, or spec.training's when unset.
_ALIGN_SETTING = (
    "(has(self.alignment.training) && has(self.alignment.training.{0})"
    " ? self.alignment.training.{0} : self.training.{0})"
)


class SecretRef(ApiModel):
    """A Secret in the SFTJob's namespace holding S3 credentials."""

    name: str = Field(min_length=1, max_length=253)
    """Secret name."""
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", max_length=253)
    """Key of the access key id in the Secret."""
    secret_access_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY", max_length=253)
    """Key of the secret access key in the Secret."""


class OutputSpec(ApiModel):
    """Where artifacts go: <uri>/<namespace>/<name>/{checkpoints,adapter,eval,merged}/ and manifest.json."""

    uri: str = Field(pattern=OUTPUT_URI, max_length=1024)
    """s3://bucket/prefix in a cluster; `sftjob run` also accepts a local directory."""
    endpoint: str | None = Field(default=None, pattern=r"^https?://", max_length=512)
    """S3 endpoint of an S3-compatible store (MinIO, SeaweedFS, ...); AWS when unset."""
    path_style: bool = False
    """Path-style addressing (needed by most S3-compatible stores)."""
    region: str | None = Field(default=None, max_length=64)
    """S3 region."""
    credentials_secret: SecretRef | None = None
    """Secret with the S3 keys (never inline keys); workload identity when unset."""
    keep_checkpoints: int = Field(default=2, ge=0, le=1000)
    """How many newest complete checkpoints to keep; 0 keeps all."""
    serving: Server = "none"
    """The server the result is handed to: vllm, tgi or none. The run checks before training that the server
    can load the adapter (DoRA, modulesToSave, rank, target modules); if it cannot, the merged model is the
    hand-off (status.artifacts.serving says why), or the SFTJob is refused when merge is disabled. A serving
    manifest is written next to the artifacts (docs/serving.md)."""


class MergeSpec(ApiModel):
    """The merge stage: the adapter folded into the full-precision base model."""

    enabled: bool = True
    """Run the merge stage (skipped for method full, whose output is already a full model)."""
    dtype: Dtype = "bfloat16"
    """dtype of the merged weights."""
    uri: str | None = Field(default=None, pattern=OUTPUT_URI, max_length=1024)
    """Where the merged model goes; <output>/merged/ when unset."""


class SFTJobSpec(ApiModel):
    """A supervised fine-tuning run: train, then evaluate, then merge."""

    model: ModelSpec
    """The base model."""
    dataset: DatasetSpec
    """Training and evaluation data."""
    method: MethodSpec = Field(default_factory=MethodSpec)
    """qlora (default), lora or full."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimisation hyperparameters."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Pods, GPUs and DeepSpeed."""
    output: OutputSpec
    """Artifact location and credentials."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation stage and gates."""
    merge: MergeSpec = Field(default_factory=MergeSpec)
    """Merge stage."""
    suspend: bool = False
    """Suspend the run: pods are deleted, a checkpoint is kept, and unsuspending resumes from it."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadlines and clean-up."""
    tracking: TrackingSpec | None = None
    """Experiment tracking (MLflow); none when unset."""
    alignment: AlignmentSpec | None = None
    """Preference alignment (DPO) after training: phase Aligning between Training and Evaluating
    (docs/alignment.md); none when unset."""

    cel_rules = (
        CelRule(
            cel="self.training.globalBatchSize % (self.training.microBatchSize * self.resources.nodes"
            " * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)) == 0",
            message="training.globalBatchSize must be a multiple of microBatchSize x world size"
            " (nodes x max(gpusPerNode, 1))",
            check=lambda s: (
                s.training.global_batch_size
                % (s.training.micro_batch_size * s.resources.nodes * max(s.resources.gpus_per_node, 1))
                == 0
            ),
            field_path=".training.globalBatchSize",
        ),
        CelRule(
            cel="!has(self.training.resumeFrom) || self.method.type != 'full'",
            message="training.resumeFrom warm-starts an adapter (lora, qlora); for method full set model.uri"
            " to the earlier run's model/",
            check=lambda s: s.training.resume_from is None or s.method.type != "full",
            field_path=".training.resumeFrom",
        ),
        CelRule(
            cel="self.resources.deepspeed.zeroStage == 3 || self.method.type != 'qlora'"
            " || self.resources.nodes * self.resources.gpusPerNode <= 1",
            message="multi-GPU qlora needs resources.deepspeed.zeroStage 3 (4-bit weights are sharded)",
            check=lambda s: (
                s.resources.deepspeed.zero_stage == 3
                or s.method.type != "qlora"
                or s.resources.nodes * s.resources.gpus_per_node <= 1
            ),
            field_path=".resources.deepspeed.zeroStage",
        ),
        *serving_rules(),  # the server named in output.serving must be able to load the hand-off
        CelRule(
            cel="!has(self.runPolicy) || !has(self.runPolicy.elastic) || self.runPolicy.elastic.minNodes <= self.resources.nodes",
            message="runPolicy.elastic.minNodes must not exceed resources.nodes (the size the group starts at)",
            check=lambda s: (
                s.run_policy.elastic is None or s.run_policy.elastic.min_nodes <= s.resources.nodes
            ),
            field_path=".runPolicy.elastic.minNodes",
        ),
        CelRule(
            cel="!has(self.runPolicy) || !has(self.runPolicy.elastic) || !has(self.runPolicy.elastic.maxNodes)"
            " || self.resources.nodes <= self.runPolicy.elastic.maxNodes",
            message="runPolicy.elastic.maxNodes must be at least resources.nodes (the size the group starts at)",
            check=lambda s: (
                s.run_policy.elastic is None
                or s.run_policy.elastic.max_nodes is None
                or s.resources.nodes <= s.run_policy.elastic.max_nodes
            ),
            field_path=".runPolicy.elastic.maxNodes",
        ),
        CelRule(
            cel="!has(self.runPolicy) || !has(self.runPolicy.elastic) || self.training.globalBatchSize % (self.training.microBatchSize"
            " * self.runPolicy.elastic.minNodes * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode"
            " : 1)) == 0",
            message="training.globalBatchSize must be a multiple of microBatchSize x the world size at minNodes"
            " (minNodes x max(gpusPerNode, 1)): the global batch is kept at every size",
            check=lambda s: (
                s.run_policy.elastic is None
                or s.training.global_batch_size
                % (
                    s.training.micro_batch_size
                    * s.run_policy.elastic.min_nodes
                    * max(s.resources.gpus_per_node, 1)
                )
                == 0
            ),
            field_path=".runPolicy.elastic.minNodes",
        ),
        CelRule(
            cel="!has(self.runPolicy) || !has(self.runPolicy.elastic) || !has(self.runPolicy.elastic.maxNodes)"
            " || self.training.globalBatchSize % (self.training.microBatchSize * self.runPolicy.elastic.maxNodes"
            " * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)) == 0",
            message="training.globalBatchSize must be a multiple of microBatchSize x the world size at maxNodes"
            " (maxNodes x max(gpusPerNode, 1)): the global batch is kept at every size",
            check=lambda s: (
                s.run_policy.elastic is None
                or s.run_policy.elastic.max_nodes is None
                or s.training.global_batch_size
                % (
                    s.training.micro_batch_size
                    * s.run_policy.elastic.max_nodes
                    * max(s.resources.gpus_per_node, 1)
                )
                == 0
            ),
            field_path=".runPolicy.elastic.maxNodes",
        ),
        CelRule(
            cel="!has(self.alignment) || "
            + _ALIGN_SETTING.format("globalBatchSize")
            + " % ("
            + _ALIGN_SETTING.format("microBatchSize")
            + " * self.resources.nodes"
            " * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)) == 0",
            message="the alignment's globalBatchSize must be a multiple of its microBatchSize x world size"
            " (unset: spec.training's)",
            check=lambda s: (
                s.alignment is None
                or s.alignment_training().global_batch_size
                % (s.alignment_training().micro_batch_size * s.world_size())
                == 0
            ),
            field_path=".alignment.training.globalBatchSize",
        ),
        CelRule(
            cel="has(self.alignment) || !has(self.eval.gates) || ("
            + " && ".join(f"!has(self.eval.gates.{g})" for g in PREFERENCE_GATES)
            + ")",
            message="eval gates on preference metrics ("
            + ", ".join(PREFERENCE_GATES)
            + ") need spec.alignment",
            check=lambda s: (
                s.alignment is not None
                or s.eval.gates is None
                or (s.eval.gates.min_preference_accuracy is None and s.eval.gates.min_reward_margin is None)
            ),
            field_path=".eval.gates",
        ),
    )

    def group_sizes(self) -> tuple[int, ...]:
        """The numbers of nodes the training group may run at, smallest first: resources.nodes, or with
        runPolicy.elastic every size from minNodes to maxNodes at which the global batch divides evenly."""
        elastic = self.run_policy.elastic
        if elastic is None:
            return (self.resources.nodes,)
        per_node = self.training.micro_batch_size * max(self.resources.gpus_per_node, 1)
        top = elastic.ceiling(self.resources.nodes)
        return tuple(
            n
            for n in range(elastic.min_nodes, top + 1)
            if self.training.global_batch_size % (per_node * n) == 0
        )

    def alignment_training(self) -> TrainingSpec:
        """The align stage's training settings: spec.alignment.training over spec.training (the learning rate
        unset: spec.training's / ALIGN_LR_DIVISOR; epochs: 1 when neither epochs nor maxSteps is set)."""
        base = self.training
        # field names, not the wire's camelCase: model_copy(update=) would set unknown attributes silently
        own = self.alignment.training.model_dump(exclude_none=True, by_alias=False) if self.alignment else {}
        if "max_steps" in own or "epochs" in own:
            base = base.model_copy(update={"epochs": None, "max_steps": None})
        own.setdefault("learning_rate", base.learning_rate / ALIGN_LR_DIVISOR)
        return base.model_copy(update=own)

    def world_size(self) -> int:
        return self.resources.nodes * max(self.resources.gpus_per_node, 1)
