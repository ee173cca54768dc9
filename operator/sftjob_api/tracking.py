"""Experiment tracking (MLflow): `spec.tracking`, `status.tracking`, and how the run id travels.

One MLflow run per SFTJob, shared by the train, eval and merge stages and by every retry: the first stage
that reaches the tracking server creates the run and records its id in the artifact store
(`Layout.TRACKING`); later stages and retries read it and log into the same run. Each stage reports the id
in its termination message (`{"tracking": {...}}`, also next to `evalResults`), from which the operator
fills `status.tracking`. See docs/tracking.md.

Credentials never pass through the spec, the trainer config, status or logs: the pods get them from a Secret as
the environment variables the MLflow client reads itself (`CREDENTIAL_ENV`).
"""

from __future__ import annotations

import json

from pydantic import Field, ValidationError

from .base import ApiModel

# http(s) with a host and no user:password@ part (credentials come from a Secret, never from the URI).
TRACKING_URI = r"^https?://[^/@?#\s]+([/?#][^\s@]*)?$"
# The environment variables the MLflow client reads (basic auth or a bearer token); one home for the names.
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
# The termination message key the stages report the run under.
MESSAGE_KEY = "tracking"


class MlflowCredentials(ApiModel):
    """A Secret in the SFTJob's namespace with the tracking server's credentials: username + password
    (basic auth) and/or a bearer token. Missing keys are simply not set."""

    name: str = Field(min_length=1, max_length=253)
    """Secret name."""
    username_key: str = Field(default=USERNAME_ENV, max_length=253)
    """Key of the username in the Secret (becomes MLFLOW_TRACKING_USERNAME)."""
    password_key: str = Field(default=PASSWORD_ENV, max_length=253)
    """Key of the password in the Secret (becomes MLFLOW_TRACKING_PASSWORD)."""
    token_key: str = Field(default=TOKEN_ENV, max_length=253)
    """Key of the bearer token in the Secret (becomes MLFLOW_TRACKING_TOKEN)."""

    def env_keys(self) -> tuple[tuple[str, str], ...]:
        """(environment variable, Secret key) pairs."""
        return (
            (USERNAME_ENV, self.username_key),
            (PASSWORD_ENV, self.password_key),
            (TOKEN_ENV, self.token_key),
        )


class MlflowSpec(ApiModel):
    """An MLflow tracking server: params (the whole spec), per-step training metrics, eval results and the
    manifest (and data report) as artifacts. Tracking failures never fail the run: they are logged as
    warnings and the run goes on untracked."""

    tracking_uri: str = Field(pattern=TRACKING_URI, max_length=1024)
    """http(s)://host[:port][/path] of the tracking server; no credentials in the URI (use credentialsSecret)."""
    experiment: str = Field(default="sftjob", min_length=1, max_length=256)
    """Experiment name (created when missing)."""
    run_name: str | None = Field(default=None, min_length=1, max_length=256)
    """Name of the MLflow run; <namespace>/<name> when unset."""
    tags: dict[str, str] = Field(default_factory=dict, max_length=64)
    """Extra tags on the MLflow run."""
    credentials_secret: MlflowCredentials | None = None
    """Secret with the tracking server's credentials; none when unset."""


class TrackingSpec(ApiModel):
    """Experiment tracking."""

    mlflow: MlflowSpec | None = None
    """Log the run to an MLflow tracking server."""


class TrackingStatus(ApiModel):
    """Where the run is tracked."""

    mlflow_run_id: str | None = Field(default=None, max_length=128)
    """The MLflow run every stage logged into."""
    mlflow_experiment_id: str | None = Field(default=None, max_length=128)
    """Its experiment."""
    mlflow_tracking_uri: str | None = Field(default=None, max_length=1024)
    """The tracking server (spec.tracking.mlflow.trackingUri)."""


def tracking_message(status: TrackingStatus) -> dict[str, object]:
    """The termination message entry a stage reports its run under."""
    return {MESSAGE_KEY: status.model_dump(mode="json", exclude_none=True)}


def parse_tracking(message: str | None) -> TrackingStatus | None:
    """status.tracking from a termination message whose last line is a JSON object with `tracking`
    (possibly next to `evalResults`); None when it holds none."""
    if not message or not message.strip():
        return None
    try:
        data = json.loads(message.strip().splitlines()[-1])
        found = TrackingStatus.model_validate(data[MESSAGE_KEY])
    except (ValueError, KeyError, TypeError, ValidationError):
        return None
    return found if found.mlflow_run_id else None
