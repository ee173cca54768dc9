"""The admin policy on SFTJobs (issue 25, docs/security.md): which URIs, images, service accounts, Secrets,
hosts and pod label/annotation keys a namespace's SFTJobs may name.

One rule list, two enforcers: `render_policy_template` turns RULES into the chart's
ValidatingAdmissionPolicy (native CEL admission: the apiserver refuses a violating SFTJob), and
`violations` checks the same rules in the operator before it creates children (for SFTJobs admitted before
the policy existed, or with the policy off in the apiserver but on in the operator).

Policy values (the chart's `admissionPolicy`, passed to the operator as JSON in SFTJOB_ADMISSION_POLICY): each
allowed list holds exact values or prefixes ending in `*`; `{namespace}` in an entry is the SFTJob's
namespace. The parameters are inlined into the CEL by Helm (JSON lists are CEL literals) rather than
a params resource: no extra CRD or ConfigMap to install, order or keep in sync, and the same JSON reaches the
operator.

python -m sftjob_api.policy --write    # update the chart's generated template
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .generated import REPO_ROOT, generated_file_main

TEMPLATE = REPO_ROOT / "helm" / "sftjob-operator" / "templates" / "admission-policy.yaml"
NS = "{namespace}"

# How a field's value is compared with its allowed list.
VALUE, MODEL_URI, OUTPUT_URI, HOST = "value", "model-uri", "output-uri", "host"


@dataclass(frozen=True)
class Rule:
    path: str  # under the SFTJob: `a.b[*].c` (each list item), `a.b{}` (each map key)
    allowed: str  # the policy's list (chart value admissionPolicy.<allowed>)
    kind: str = VALUE

    @property
    def requirement(self) -> str:
        """What each value must satisfy: the message after the field's path."""
        what = {
            VALUE: "must match an entry of",
            MODEL_URI: "must be a model-cache name (if allowed) or match an entry of",
            OUTPUT_URI: "with /<namespace>/ appended (where the runs go) must match an entry of",
            HOST: "must name a host (or scheme://host) matching an entry of",
        }[self.kind]
        keys = "(keys) " if self.path.endswith("{}") else ""
        return f"{keys}{what} admissionPolicy.{self.allowed}"

    @property
    def message(self) -> str:
        return f"{self.path.replace('{}', '')} {self.requirement}"


RULES: tuple[Rule, ...] = (
    Rule("spec.model.uri", "uriPrefixes", MODEL_URI),
    Rule("spec.model.tokenizer", "uriPrefixes", MODEL_URI),
    Rule("spec.dataset.train[*]", "uriPrefixes"),
    Rule("spec.dataset.sources[*].files[*]", "uriPrefixes"),
    Rule("spec.dataset.eval[*]", "uriPrefixes"),
    Rule("spec.alignment.dataset.train[*]", "uriPrefixes"),
    Rule("spec.alignment.dataset.eval[*]", "uriPrefixes"),
    Rule("spec.output.uri", "uriPrefixes", OUTPUT_URI),
    Rule("spec.merge.uri", "uriPrefixes"),
    Rule("spec.training.resumeFrom", "uriPrefixes"),
    Rule("spec.resources.image", "images"),
    Rule("spec.resources.serviceAccountName", "serviceAccounts"),
    Rule("spec.resources.priorityClassName", "priorityClasses"),
    Rule("spec.output.credentialsSecret.name", "secretNames"),
    Rule("spec.tracking.mlflow.credentialsSecret.name", "secretNames"),
    Rule("spec.output.endpoint", "hosts", HOST),
    Rule("spec.tracking.mlflow.trackingUri", "hosts", HOST),
    Rule("spec.resources.podLabels{}", "podLabelKeys"),
    Rule("spec.resources.podAnnotations{}", "podAnnotationKeys"),
)
LISTS = tuple(dict.fromkeys(r.allowed for r in RULES))


# ---- the operator's check ------------------------------------------------------------------------------------


def _allowed(value: str, entries: Sequence[str], namespace: str) -> bool:
    for entry in entries:
        entry = entry.replace(NS, namespace)
        if value.startswith(entry[:-1]) if entry.endswith("*") else value == entry:
            return True
    return False


def _ok(rule: Rule, value: str, policy: Mapping[str, Any], namespace: str) -> bool:
    entries = policy.get(rule.allowed) or []
    if rule.kind == MODEL_URI and policy.get("modelCacheNames") and "/" not in value:
        return True  # a name from the trainer image's model cache reads no tenant's data
    if rule.kind == OUTPUT_URI:
        value = f"{value.rstrip('/')}/{namespace}/"  # layout.run_root: runs go under <uri>/<namespace>/
    if rule.kind == HOST:  # an entry with a scheme (https://*) also pins the scheme
        url = urlsplit(value)
        host = (url.hostname or "").lower()
        return any(
            _allowed(f"{url.scheme.lower()}://{host}" if "://" in e else host, [e], namespace)
            for e in entries
        )
    return _allowed(value, entries, namespace)


def _values(node: Any, steps: list[str], where: str) -> Iterator[tuple[str, str]]:
    """(field path, value) for every value `steps` reaches from `node` (absent fields: none)."""
    if not steps:
        if isinstance(node, str):
            yield where.rstrip("."), node
        return
    step, rest = steps[0], steps[1:]
    name = step.removesuffix("[*]").removesuffix("{}")
    child = node.get(name) if isinstance(node, dict) else None
    if child is None:
        return
    if step.endswith("[*]") and isinstance(child, list):
        for i, item in enumerate(child):
            yield from _values(item, rest, f"{where}{name}[{i}].")
    elif step.endswith("{}") and isinstance(child, dict):
        for key in child:
            yield f"{where}{name}[{key}]", key
    elif not step.endswith(("[*]", "{}")):
        yield from _values(child, rest, f"{where}{name}.")


def violations(sftjob: Mapping[str, Any], namespace: str, policy: Mapping[str, Any]) -> list[str]:
    """What the admission policy would refuse in this SFTJob (the raw object, camelCase): one message per
    offending value, naming its field."""
    out = []
    for rule in RULES:
        for where, value in _values(sftjob, rule.path.split("."), ""):
            if not _ok(rule, value, policy, namespace):
                out.append(f"{where}: {value[:200]!r} {rule.requirement}")
    return out


def parse_policy(text: str) -> dict[str, Any]:
    """The policy from its JSON (SFTJOB_ADMISSION_POLICY); ValueError on a malformed one, at start rather than
    on the first SFTJob. A list left out allows nothing."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("the admission policy must be a JSON object")
    unknown = set(raw) - {*LISTS, "modelCacheNames"}
    if unknown:
        raise ValueError(f"unknown admission policy keys: {sorted(unknown)}")
    for name in LISTS:
        entries = raw.setdefault(name, [])
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"admission policy {name}: a list of strings")
    if not isinstance(raw.setdefault("modelCacheNames", False), bool):
        raise ValueError("admission policy modelCacheNames: true or false")
    return raw


def policy_error(sftjob: Mapping[str, Any], namespace: str, policy: Mapping[str, Any] | None) -> str | None:
    """The InvalidSpec message for an SFTJob the policy refuses (None: allowed, or no policy)."""
    found = violations(sftjob, namespace, policy) if policy is not None else []
    return "refused by the admin policy: " + "; ".join(found[:5]) if found else None


# ---- the chart's ValidatingAdmissionPolicy -------------------------------------------------------------------


def _cel_ok(rule: Rule, v: str) -> str:
    if rule.kind == OUTPUT_URI:
        v = f"({v}.endsWith('/') ? {v}.substring(0, size({v}) - 1) : {v}) + '/' + request.namespace + '/'"
    if rule.kind == HOST:  # `a` is the entry the value is compared with (exists() below)
        host = f"url({v}).getHostname().lowerAscii()"
        v = f"(a.contains('://') ? url({v}).getScheme().lowerAscii() + '://' + {host} : {host})"
    match = (
        f"variables.{rule.allowed}.exists(a, a.endsWith('*')"
        f" ? ({v}).startsWith(a.substring(0, size(a) - 1)) : ({v}) == a)"
    )
    if rule.kind == MODEL_URI:
        return f"(variables.modelCacheNames && !{v}.contains('/')) || {match}"
    return match


def rule_cel(rule: Rule) -> str:
    """A CEL expression true when every value the rule's path reaches is allowed."""

    def walk(cur: str, rest: list[str], depth: int) -> str:
        if not rest:
            return _cel_ok(rule, cur)
        step, name = rest[0], rest[0].removesuffix("[*]").removesuffix("{}")
        field = f"{cur}.{name}"
        if step.endswith(("[*]", "{}")):
            x = f"x{depth}"
            inner = _cel_ok(rule, x) if step.endswith("{}") else walk(x, rest[1:], depth + 1)
            inner = f"{field}.all({x}, {inner})"  # all() over a map goes over its keys
        else:
            inner = walk(field, rest[1:], depth)
        return f"!has({field}) || ({inner})"

    return walk("object", rule.path.split("."), 0)


def render_policy_template() -> str:
    """The chart template: the policy and its binding; Helm fills in the values (sftjob.admissionPolicy)."""
    lines = [
        "# Generated by `python -m sftjob_api.policy --write` from RULES in operator/sftjob_api/policy.py.",
        "# Do not edit. docs/security.md and docs/install.md (Shared clusters) explain the values.",
        "{{- if .Values.admissionPolicy.enabled }}",
        '{{- $policy := include "sftjob.admissionPolicy" . | fromJson }}',
        "apiVersion: admissionregistration.k8s.io/v1",
        "kind: ValidatingAdmissionPolicy",
        "metadata:",
        '  name: {{ include "sftjob.fullname" . }}-tenancy',
        '  labels: {{- include "sftjob.labels" . | nindent 4 }}',
        "spec:",
        "  failurePolicy: Fail",
        "  matchConstraints:",
        "    resourceRules:",
        "      - apiGroups: [sft.tuning.dev]",
        '        apiVersions: ["*"]',
        "        operations: [CREATE, UPDATE]",
        "        resources: [sftjobs]",
        "  variables:",
        "    - name: modelCacheNames",
        "      expression: {{ $policy.modelCacheNames | toJson | quote }}",
    ]
    for name in LISTS:  # each list (a CEL literal: JSON) with {namespace} filled in
        cel = f"%s.map(a, a.replace('{NS}', request.namespace))"
        lines += [
            f"    - name: {name}",
            f'      expression: {{{{ printf "{cel}" (toJson $policy.{name}) | toJson }}}}',
        ]
    lines.append("  validations:")
    for rule in RULES:
        lines += [
            f"    - expression: {_quote(rule_cel(rule))}",
            f"      message: {_quote(rule.message)}",
            "      reason: Forbidden",
        ]
    lines += [
        "---",
        "apiVersion: admissionregistration.k8s.io/v1",
        "kind: ValidatingAdmissionPolicyBinding",
        "metadata:",
        '  name: {{ include "sftjob.fullname" . }}-tenancy',
        '  labels: {{- include "sftjob.labels" . | nindent 4 }}',
        "spec:",
        '  policyName: {{ include "sftjob.fullname" . }}-tenancy',
        "  validationActions: [Deny]",
        "{{- end }}",
    ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"  # YAML single quotes: only ' is escaped


def main(argv: list[str] | None = None) -> int:
    return generated_file_main(argv, __doc__, TEMPLATE, render_policy_template, "sftjob_api.policy")


if __name__ == "__main__":
    sys.exit(main())
