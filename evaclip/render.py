"""The rendered trainer config: what a training pod reads, made from a manifest.

`evaclip run --local` and the operator (as a ConfigMap) hand the trainer the very same
document, so a job behaves the same on a laptop and on a cluster. It holds the resolved
spec with every default filled in and only references to secrets, never their values.
"""

from __future__ import annotations

import json
from typing import Any

from evaclip.spec import API_VERSION, KIND, EvaClipFinetune

CONFIG_FILE = "config.json"
CONFIG_MOUNT = "/etc/evaclip"
CONFIG_ENV = "EVACLIP_CONFIG"


def trainer_config(resource: EvaClipFinetune) -> dict[str, Any]:
    """The resolved job as the trainer consumes it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": resource.name, "namespace": resource.namespace},
        "spec": resource.spec.model_dump(mode="json", by_alias=True),
    }


def trainer_config_json(resource: EvaClipFinetune) -> str:
    return json.dumps(trainer_config(resource), indent=2, sort_keys=True) + "\n"
