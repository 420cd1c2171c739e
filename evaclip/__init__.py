"""evaclip-operator: fine-tune EVA-CLIP vision towers on Kubernetes.

Import names: `evaclip` (the job spec, presets, storage, CLI), `evaclip.trainer` (the
training program, from the `trainer/` folder) and `evaclip.operator` (the controller,
from the `operator/` folder). The `operator/` folder has no `__init__.py` on purpose: a
package there would shadow the standard library's `operator` module for any Python
started in the repository root.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# An installed wheel holds evaclip/operator/ itself. In a source checkout (editable
# install) the folder sits at the repository root, so it is added to this package's
# search path, which makes `evaclip.operator` a namespace subpackage found there.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "operator").is_dir():
    __path__.append(str(_checkout))  # noqa: F821 - module __path__ of a package
