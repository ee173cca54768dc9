"""`SFTJob.spec.alignment`: preference alignment (DPO) after SFT, in the same run (docs/alignment.md).

The align stage starts from the SFT result and optimises the DPO loss on preference pairs; the reference
policy is the SFT result itself. Its training settings default from spec.training (`SFTJobSpec.
alignment_training`), the learning rate to a tenth of it: a DPO step on an already fine-tuned policy wants a
smaller step than SFT (TRL's defaults differ by 20x).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field

from .base import ApiModel, CelRule
from .dataset import DataUri

PreferenceFormat = Literal["preference", "preference_messages"]
DpoLoss = Literal["sigmoid", "ipo"]
# spec.training and spec.alignment.training: a run's length is given one way.
EPOCHS_XOR_MAX_STEPS = CelRule(
    cel="!(has(self.epochs) && has(self.maxSteps))",
    message="set either epochs or maxSteps, not both",
    check=lambda t: t.epochs is None or t.max_steps is None,
    field_path=".maxSteps",
)
# Unset alignment.training.learningRate: spec.training.learningRate divided by this.
ALIGN_LR_DIVISOR = 10


class PreferenceFieldMapping(ApiModel):
    """Column names of the preference files when they differ from the defaults."""

    prompt: str = Field(default="prompt", max_length=128)
    """preference: the prompt column (a string, or a list of {role, content} turns rendered with the chat
    template)."""
    chosen: str = Field(default="chosen", max_length=128)
    """The preferred response: a string (preference), or the whole conversation whose last assistant turn is
    the preferred one (preference_messages)."""
    rejected: str = Field(default="rejected", max_length=128)
    """The dispreferred response, in the same form as chosen."""


class PreferenceDataset(ApiModel):
    """Preference pairs: a prompt, a chosen and a rejected response."""

    train: list[DataUri] = Field(min_length=1, max_length=64)
    """Pair files: s3://bucket/key or paths (JSONL or Parquet, chosen by extension); `sftjob run` also accepts
    ./relative paths, resolved against the manifest's directory."""
    eval: list[DataUri] | None = Field(default=None, max_length=64)
    """Held-out pairs for preference accuracy and reward margin in the eval stage. If unset, evalSplit of the
    pairs is held out."""
    eval_split: float = Field(default=0.1, gt=0, lt=0.5)
    """Fraction of pairs held out (fixed seed) when eval is unset."""
    format: PreferenceFormat = "preference"
    """preference: {prompt, chosen, rejected} with string responses; preference_messages: {chosen, rejected}
    as two conversations that share every turn but the last assistant turn (the prompt is the shared part)."""
    field_mapping: PreferenceFieldMapping = Field(default_factory=PreferenceFieldMapping)
    """Column names when they differ from the defaults."""
    max_seq_length: int | None = Field(default=None, ge=16, le=131072)
    """Maximum tokens of prompt + response (each of chosen and rejected); dataset.maxSeqLength when unset.
    Longer prompts are truncated from the left so the responses stay."""

    def input_uris(self) -> list[tuple[str, str]]:
        """(field path under spec.alignment.dataset, uri) for every file this spec reads."""
        return [(f"train.{i}", u) for i, u in enumerate(self.train)] + [
            (f"eval.{i}", u) for i, u in enumerate(self.eval or [])
        ]

    def with_uris(self, fn: Callable[[str], str]) -> PreferenceDataset:
        """A copy with every file's uri mapped by fn (pvc:// -> mount path, ./relative -> absolute)."""
        return self.model_copy(
            update={"train": [fn(u) for u in self.train], "eval": self.eval and [fn(u) for u in self.eval]}
        )


class AlignmentTraining(ApiModel):
    """The align stage's optimisation settings; each unset field takes spec.training's value (the learning
    rate: a tenth of it)."""

    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the preference pairs (default 1 when maxSteps is unset)."""
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Optimizer steps to run; exclusive with epochs."""
    learning_rate: float | None = Field(default=None, gt=0, lt=1)
    """Peak learning rate; spec.training.learningRate / 10 when unset."""
    warmup_ratio: float | None = Field(default=None, ge=0, le=0.5)
    """Fraction of the steps spent warming up; spec.training.warmupRatio when unset."""
    global_batch_size: int | None = Field(default=None, ge=1, le=65536)
    """Pairs per optimizer step across all ranks; spec.training.globalBatchSize when unset."""
    micro_batch_size: int | None = Field(default=None, ge=1, le=4096)
    """Pairs per rank per forward pass (each pair is two sequences); spec.training.microBatchSize when unset."""
    checkpoint_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Save a resumable checkpoint every N steps; spec.training.checkpointSteps when unset."""

    cel_rules = (EPOCHS_XOR_MAX_STEPS,)


class AlignmentSpec(ApiModel):
    """Preference alignment after SFT: the align stage (phase Aligning) runs between training and evaluation,
    and the eval and merge stages then use the aligned weights."""

    method: Literal["dpo"] = "dpo"
    """dpo: Direct Preference Optimization against the SFT result as the reference policy."""
    loss: DpoLoss = "sigmoid"
    """sigmoid: the DPO paper's loss, -log sigmoid(beta * margin); ipo: (margin - 1 / (2 beta))^2 (IPO)."""
    beta: float = Field(default=0.1, gt=0, le=10)
    """How far the policy may move from the reference: higher keeps it closer."""
    sft_loss_weight: float = Field(default=0.0, ge=0, le=100)
    """Adds this weight times the chosen response's mean token negative log-likelihood to each pair's loss
    (RPO, Pang et al. 2024; TRL's loss_type ["sigmoid", "sft"]): keeps the chosen responses likely, so a
    large preference shift does not drag the SFT task's outputs down with the rejected ones. 0: plain DPO."""
    dataset: PreferenceDataset
    """The preference pairs."""
    training: AlignmentTraining = Field(default_factory=AlignmentTraining)
    """Optimisation settings (defaults from spec.training)."""
