"""Names of the trainer's Prometheus metrics: the trainer exports them, the operator's progress reader, the
Grafana dashboards and the alert rules read them. Labels: namespace, sftjob, rank (plus `reason` on the drop
counter, `source` on the source gauge, `content_hash` and `reused` on the training set gauge).
A Counter named `X` is exposed as `X_total`; a Histogram as `X_sum`, `X_count`, `X_bucket`.
"""

from __future__ import annotations

TRAIN_STEP = "sft_train_step"
TRAIN_TOTAL_STEPS = "sft_train_total_steps"
TRAIN_LOSS = "sft_train_loss"
TRAIN_EPOCH = "sft_train_epoch"
TRAIN_TOKENS = "sft_train_tokens"  # Counter: sft_train_tokens_total
TRAIN_TOKENS_PER_SECOND = "sft_train_tokens_per_second"
TRAIN_ETA_SECONDS = "sft_train_eta_seconds"
TRAIN_GRAD_NORM = "sft_train_grad_norm"
LEARNING_RATE = "sft_learning_rate"
MEMORY_USED_BYTES = "sft_memory_used_bytes"
GPU_MEMORY_BYTES = "sft_gpu_memory_bytes"
CHECKPOINT_SAVE_SECONDS = "sft_checkpoint_save_duration_seconds"  # Histogram
DATA_ROWS_DROPPED = "sft_data_rows_dropped"  # Counter: sft_data_rows_dropped_total
DATA_SOURCE_ROWS = "sft_data_source_rows"  # Gauge, label `source`: samples each source gave the mixture
# Gauge, labels `content_hash` and `reused` ("true"/"false"): the curated training set's size and identity
DATA_TRAIN_EXAMPLES = "sft_data_train_examples"
# The newest checkpoint: saved by this run, or (before its first save) the one it resumed from.
TRAIN_CHECKPOINT_STEP = "sft_train_checkpoint_step"
TRAIN_RESUMED_FROM_STEP = "sft_train_resumed_from_step"

# The align stage (DPO, spec.alignment) exports the training metrics above for its own steps (sft_train_loss
# is then the DPO loss; the operator's progress reader and stall detection read them unchanged) and, per
# optimizer step, these means over the step's pairs. Rewards are beta * (policy - reference) log-probability
# of a response; log-probabilities are summed over its tokens.
ALIGN_REWARDS_CHOSEN = "sft_align_rewards_chosen"
ALIGN_REWARDS_REJECTED = "sft_align_rewards_rejected"
ALIGN_REWARD_MARGIN = "sft_align_reward_margin"  # chosen - rejected
ALIGN_REWARD_ACCURACY = "sft_align_reward_accuracy"  # share of pairs with chosen reward > rejected
ALIGN_LOGPS_CHOSEN = "sft_align_logps_chosen"  # policy
ALIGN_LOGPS_REJECTED = "sft_align_logps_rejected"
ALIGN_REF_LOGPS_CHOSEN = "sft_align_ref_logps_chosen"  # reference (the SFT result)
ALIGN_REF_LOGPS_REJECTED = "sft_align_ref_logps_rejected"

LABELS = ("namespace", "sftjob", "rank")
