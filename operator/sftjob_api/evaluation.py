"""Eval metrics, their results and the gates on them: one list of metrics, one gate check.

The eval stage computes `EvalMetrics`, checks `EvalGates.failures(results)` (exit code EVAL_GATE_FAILED when
any gate fails) and reports the results; the operator records them as status.evalResults and checks the same
gates with the same method.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel, CelRule

Metric = Literal["loss", "perplexity", "rouge_l", "exact_match"]
ALL_METRICS: tuple[Metric, ...] = ("loss", "perplexity", "rouge_l", "exact_match")


class EvalMetrics(ApiModel):
    """The metrics of one model on the held-out data (unset: not computed)."""

    eval_loss: float | None = None
    """Mean token cross-entropy on the held-out data (response tokens only)."""
    perplexity: float | None = None
    """exp(evalLoss)."""
    rouge_l: float | None = None
    """ROUGE-L F1 of generations against references."""
    exact_match: float | None = None
    """Share of generations equal to the reference after normalisation."""
    preference_accuracy: float | None = None
    """With spec.alignment: share of held-out pairs whose chosen response gets the higher implicit reward
    (policy vs reference log-probability ratio) than the rejected one."""
    reward_margin: float | None = None
    """With spec.alignment: mean implicit reward of chosen minus rejected on the held-out pairs."""


# (gate field, metric field, the gate is an upper bound)
GATE_CHECKS: tuple[tuple[str, str, bool], ...] = (
    ("max_eval_loss", "eval_loss", True),
    ("max_perplexity", "perplexity", True),
    ("min_rouge_l", "rouge_l", False),
    ("min_exact_match", "exact_match", False),
    ("min_preference_accuracy", "preference_accuracy", False),
    ("min_reward_margin", "reward_margin", False),
)
# Gates on the preference metrics: they need spec.alignment (a rule of SFTJobSpec).
PREFERENCE_GATES = ("minPreferenceAccuracy", "minRewardMargin")


class EvalGates(ApiModel):
    """Thresholds that must hold for the merge to run; a failed gate ends in Failed/EvalGateFailed."""

    max_eval_loss: float | None = Field(default=None, gt=0)
    """Highest acceptable eval loss."""
    max_perplexity: float | None = Field(default=None, gt=1)
    """Highest acceptable perplexity."""
    min_rouge_l: float | None = Field(default=None, ge=0, le=1)
    """Lowest acceptable ROUGE-L F1."""
    min_exact_match: float | None = Field(default=None, ge=0, le=1)
    """Lowest acceptable exact-match rate."""
    min_preference_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Lowest acceptable held-out preference accuracy (needs spec.alignment)."""
    min_reward_margin: float | None = Field(default=None, ge=-1000, le=1000)
    """Lowest acceptable held-out mean reward margin (needs spec.alignment)."""

    def failures(self, results: EvalMetrics) -> list[str]:
        """Gates that do not hold, as "maxEvalLoss: 2.31 > 2.0"; a gate whose metric is missing fails too."""
        out: list[str] = []
        for gate_field, metric_field, is_max in GATE_CHECKS:
            limit = getattr(self, gate_field)
            if limit is None:
                continue
            gate = EvalGates.model_fields[gate_field].alias or gate_field
            value = getattr(results, metric_field)
            if value is None:
                metric = EvalMetrics.model_fields[metric_field].alias or metric_field
                out.append(f"{gate}: {metric} was not computed")
            elif is_max and value > limit:
                out.append(f"{gate}: {value:.4g} > {limit:.4g}")
            elif not is_max and value < limit:
                out.append(f"{gate}: {value:.4g} < {limit:.4g}")
        return out


class EvalSpec(ApiModel):
    """The evaluation stage after training."""

    enabled: bool = True
    """Run the evaluation stage."""
    metrics: list[Metric] = Field(default_factory=lambda: list(ALL_METRICS), min_length=1, max_length=4)
    """Metrics to compute on the held-out data."""
    max_samples: int = Field(default=64, ge=1, le=100_000)
    """Held-out samples generated for ROUGE-L and exact match."""
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    """Generation length limit for those samples."""
    gates: EvalGates | None = None
    """Thresholds that block the merge."""

    cel_rules = (
        CelRule(
            cel="!has(self.gates) || self.enabled",
            message="gates require eval enabled",
            check=lambda e: e.gates is None or e.enabled,
            field_path=".gates",
        ),
        CelRule(
            cel="!has(self.gates) || !has(self.gates.minRougeL) || 'rouge_l' in self.metrics",
            message="gates.minRougeL requires rouge_l in metrics",
            check=lambda e: e.gates is None or e.gates.min_rouge_l is None or "rouge_l" in e.metrics,
            field_path=".gates.minRougeL",
        ),
        CelRule(
            cel="!has(self.gates) || !has(self.gates.minExactMatch) || 'exact_match' in self.metrics",
            message="gates.minExactMatch requires exact_match in metrics",
            check=lambda e: e.gates is None or e.gates.min_exact_match is None or "exact_match" in e.metrics,
            field_path=".gates.minExactMatch",
        ),
    )
