"""What a run leaves under its output URI, and how it gets there atomically.

Every method writes its files into one local folder (`output_dir(ctx)`) and then calls
`publish(ctx, folder)`, which uploads it through `Storage.publish`: the final manifest
(`_SUCCESS.json`) is removed first and written last, so a failed run never leaves
something that looks complete.

Files written here for every method (`write_common_outputs`):

* `metrics.json`: validation top-1/top-5, per-class accuracy, confusion matrix, per-epoch
  history, timings and the counts of skipped images;
* `confusion_matrix.png` and `loss_curve.png` (matplotlib, Agg backend);
* `config.json`: the resolved job config, as rendered for the trainer (no secret values).

The linear probe adds `head.safetensors` (`weight` [classes, embed], `bias` [classes];
apply to the tower's embeddings, L2-normalised when head.json says so) and `head.json`
(`write_head`). Fine-tuning methods add their adapters or weights to the same folder
before publishing.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from evaclip.trainer.context import JobContext

log = logging.getLogger("evaclip.trainer")

HEAD_FILE = "head.safetensors"
HEAD_INFO_FILE = "head.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
CONFUSION_FILE = "confusion_matrix.png"
LOSS_FILE = "loss_curve.png"


def output_dir(ctx: JobContext) -> Path:
    """An empty local folder for this run's outputs, in the node-local workdir."""
    path = Path(ctx.workdir) / "outputs"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def head_info(ctx: JobContext, class_names: Sequence[str], embed_dim: int) -> dict[str, Any]:
    """head.json: what a user needs to apply the head to new images."""
    from evaclip.models.presets import get_preset
    from evaclip.trainer.data import preprocessing_info

    preset = get_preset(ctx.spec.model.preset)
    return {
        "format": "evaclip.io/linear-head/v1",
        "classNames": list(class_names),
        "numClasses": len(class_names),
        "embeddingSize": embed_dim,
        "featureNormalization": "l2" if ctx.spec.training.normalize_features else "none",
        "preset": preset.name,
        "weights": ctx.spec.model.weights,
        "precision": ctx.spec.model.precision,
        "preprocessing": preprocessing_info(preset),
        "tensors": {"weight": [len(class_names), embed_dim], "bias": [len(class_names)]},
        "usage": "logits = weight @ normalize(embedding) + bias",
    }


def write_head(folder: Path, ctx: JobContext, weight: torch.Tensor, bias: torch.Tensor,
               class_names: Sequence[str]) -> None:
    """head.safetensors and head.json of a linear classifier on the tower's embeddings."""
    from safetensors.torch import save_file

    info = head_info(ctx, class_names, int(weight.shape[1]))
    save_file(
        {"weight": weight.detach().float().contiguous().cpu(),
         "bias": bias.detach().float().contiguous().cpu()},
        str(folder / HEAD_FILE),
        metadata={"classNames": json.dumps(list(class_names)), "preset": info["preset"],
                  "featureNormalization": info["featureNormalization"]},
    )
    write_json(folder / HEAD_INFO_FILE, info)


def load_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) from a head.safetensors file."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["weight"], tensors["bias"]


def plot_confusion(path: Path, matrix: Sequence[Sequence[int]],
                   class_names: Sequence[str]) -> Path:
    """The validation confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix)
    n = len(class_names)
    size = min(16.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(n)
    labels = list(class_names) if n <= 50 else [""] * n
    ax.set_xticks(ticks, labels, rotation=90 if n > 10 else 0)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Validation confusion matrix")
    if n <= 20:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_history(path: Path, history: Sequence[dict[str, Any]]) -> Path:
    """Training loss (and validation top-1 when recorded) per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [h["trainLoss"] for h in history], color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    if any(h.get("valTop1") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("valTop1") for h in history], color="tab:orange",
                 label="validation top-1")
        ax2.set_ylabel("validation top-1")
        ax2.set_ylim(0, 1)
    ax.set_title("Training")
    fig.legend(loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.93), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_common_outputs(folder: Path, ctx: JobContext, metrics: dict[str, Any],
                         class_names: Sequence[str]) -> None:
    """metrics.json, the confusion-matrix and loss plots, and the resolved config.json.

    `metrics` needs `confusionMatrix` (list of rows) and `history` (list of dicts with
    `epoch`, `trainLoss` and optionally `valTop1`) for the plots; both are optional.
    """
    from evaclip.render import trainer_config

    write_json(folder / METRICS_FILE, metrics)
    write_json(folder / CONFIG_FILE, trainer_config(ctx.resource))
    if metrics.get("confusionMatrix"):
        plot_confusion(folder / CONFUSION_FILE, metrics["confusionMatrix"], class_names)
    if metrics.get("history"):
        plot_history(folder / LOSS_FILE, metrics["history"])


def publish(ctx: JobContext, folder: Path, extra: dict[str, Any] | None = None) -> str:
    """Upload `folder` to the output URI; the manifest goes last. Returns its URI."""
    return ctx.storage.publish(folder, ctx.output_uri, extra=extra)
