"""Files a pod's downward-API volume holds, read from the pod template the operator rendered, the way the
kubelet resolves them: a test that reads the trainer config through this fails when the mount, the volume
item or the annotation behind it drift apart."""

from __future__ import annotations

import re
from typing import Any

ANNOTATION_FIELD = re.compile(r"metadata\.annotations\['(?P<key>[^']+)'\]")


def downward_api_file(template: dict[str, Any], path: str) -> str:
    """The content of `path` inside the (first) container of pod `template`."""
    directory, _, file = path.rpartition("/")
    (container, *_) = template["spec"]["containers"]
    volume_name = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == directory)
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == volume_name)
    item = next(i for i in volume["downwardAPI"]["items"] if i["path"] == file)
    field = ANNOTATION_FIELD.fullmatch(item["fieldRef"]["fieldPath"])
    assert field is not None, item
    value: str = template["metadata"]["annotations"][field["key"]]
    return value


def trainer_config_file(job: dict[str, Any]) -> str:
    """The trainer config file the pods of a rendered stage Job read."""
    from sftjob_operator.render.trainer_config import CONFIG_PATH

    return downward_api_file(job["spec"]["template"], CONFIG_PATH)
