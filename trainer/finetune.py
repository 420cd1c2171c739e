"""Fine-tuning recipe: LoRA, partial and full fine-tuning of an EVA-CLIP tower under DeepSpeed.

One class, `FinetuneRecipe`, with `setup`, `train`, `save_checkpoint`, `finish` (outputs)
and `cleanup`; `run(ctx)` drives it. What it supports and the spec keys behind each feature:

- methods (`spec.method.type`): `lora` (peft LoRA on `method.lora.targetModules`, with
  `rank`, `alpha`, `dropout`, `includeMlp`), `partial` (the last
  `method.partial.trainableBlocks` blocks, the final norm and the CLIP projection), `full`.
  Each trains the tower and a linear classifier head on the embedding (L2-normalised when
  `training.normalizeFeatures`).
- DeepSpeed from `spec.deepspeed` (ZeRO 0-3, offload, user config merged over the rendered
  one, see `deepspeed_config.py`), precision `model.precision`, micro-batch
  `training.batchSize`, `training.gradientAccumulationSteps`, `training.gradientClipping`.
- AdamW with `training.learningRate` for the head and `training.backboneLearningRate`
  with `training.layerDecay` for the tower, `training.weightDecay` except on norms, biases
  and embeddings (`param_groups.py`); linear warm-up over `training.warmupFraction` of the
  steps, then cosine decay, stepped by DeepSpeed at each optimizer step.
- `deepspeed.activationCheckpointing` recomputes blocks in backward (timm's
  `set_grad_checkpointing`); `training.augment` uses the random resized crop and flip of
  the data module's training transform; `training.labelSmoothing` in the loss.
- Checkpoints every `checkpoint.everySteps` optimizer steps and at each epoch end, keeping
  `checkpoint.keepLast` (`checkpointing.py`). A restarted job resumes from the newest
  complete one at the same step, learning-rate position and data order: the sampler's
  epoch is restored, the batches already done in that epoch are skipped (they are still
  read and decoded, which costs data-loading time), and the random state of the
  augmentation is re-seeded per epoch from `training.seed`. Only a checkpoint that this
  job wrote is resumed (its recorded job fingerprint must match, `checkpointing.py`);
  another job's checkpoints under the same output stop the job at start-up.
- Outputs under `spec.output`: `head.safetensors` and `head.json`; lora `adapter/`
  (`adapter_config.json`, `adapter_model.safetensors`) for
  `peft.PeftModel.from_pretrained(build_tower(preset...), ".../adapter")`,
  that is, onto the `EvaClipTower` (module names `trunk.blocks.N.attn.qkv`); partial
  `weights/trained.safetensors` (the trained tower tensors, `trunk.*` names); full the
  whole tower in `weights/` (one `model.safetensors`, or shards past 5 GB with
  `model.safetensors.index.json`); per-epoch `metrics.json` and `loss_curve.png`. The
  head works on the standardised embedding while training (see `Classifier`); the
  published one has the standardisation folded in.
- Weights are read memory-mapped and cast to the training precision on each rank before
  DeepSpeed takes the module, so a node holds one copy per rank in host memory at that
  precision (about 35 GB per rank for eva-clip-18b in bf16) until it is on the GPUs;
  ZeRO-3 partitioning at construction (`deepspeed.zero.Init`) is not used.

Not supported, refused at start-up: fp16 without GPUs, LoRA targets that match no linear,
more trainable blocks than the preset has, offload with the wrong ZeRO stage (spec rules),
and a plan that does not fit the GPUs (`evaclip.plan.require_fit`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evaclip.errors import UserError
from evaclip.plan import lora_target_regex, lora_targets, partial_trains, require_fit
from evaclip.trainer.checkpointing import CheckpointManager, job_settings
from evaclip.trainer.deepspeed_config import render_deepspeed_config
from evaclip.trainer.param_groups import build_param_groups, optimizer_groups, warmup_cosine

if TYPE_CHECKING:
    from evaclip.models.tower import EvaClipTower
    from evaclip.spec import EvaClipFinetuneSpec
    from evaclip.trainer.context import JobContext

log = logging.getLogger("evaclip.trainer")

SHARD_BYTES = 5 * 10**9
PID_FILE = "rank-{rank}.pid"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Standardize(nn.Module):
    """Per-dimension standardisation of embeddings, `(z - mean) / std`.

    Training uses each micro-batch's own statistics (as a BatchNorm without affine
    parameters does); evaluation and the exported head use `mean` and `inv_std`, measured
    over training images with the current tower just before each validation
    (`FinetuneRecipe._measure_statistics`). Statistics are computed in fp32.
    """

    eps = 1e-12

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.float()
        if self.training and len(x) > 1:
            mean = x.mean(0)
            inv_std = (x.var(0, unbiased=False) + self.eps).rsqrt()
        else:
            mean, inv_std = self.mean.float(), self.inv_std.float()
        return ((x - mean) * inv_std).to(z.dtype)


class Classifier(nn.Module):
    """A tower (bare, or wrapped by peft) followed by a linear head on its embedding.

    Between the two, the (optionally L2-normalised) embedding is standardised per dimension
    (`Standardize`): the linear probe standardises its cached features the same way, and
    without it the head of a tower whose embeddings share a large common direction (a
    random tower's do, to a cosine of 0.997) hardly learns. The measured statistics are
    folded into the exported head (`folded_head`), so the published head is a plain
    `weight @ embedding + bias` like the linear probe's.
    """

    def __init__(self, tower: nn.Module, embed_dim: int, num_classes: int,
                 normalize: bool) -> None:
        super().__init__()
        self.tower = tower
        self.standardize = Standardize(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.normalize = normalize

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        z = self.tower(images)
        return nn.functional.normalize(z, dim=-1) if self.normalize else z

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardize(self.embed(images)))

    def folded_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the head with the standardisation folded in, in fp32."""
        s = self.standardize
        weight = self.head.weight.detach().float() * s.inv_std.float()
        bias = self.head.bias.detach().float() - weight @ s.mean.float()
        return weight, bias


# --- methods ----------------------------------------------------------------------------


def prepare_for_lora(tower: EvaClipTower) -> EvaClipTower:
    """Route the fused qkv projection through its module, so LoRA on `qkv` takes effect.

    With a q/v bias (eva02-clip-e14 towers) timm's Eva by default calls `F.linear` on the
    qkv weight itself, bypassing a LoRA wrapper around the module; the separate-bias path
    is the same arithmetic through the module. `build_tower` already sets it on every
    tower it builds; this keeps towers built otherwise (timm directly) working too.
    Towers without a qkv bias are unaffected.
    """
    for block in tower.trunk.blocks:
        if hasattr(block.attn, "qkv_bias_separate"):
            block.attn.qkv_bias_separate = True
    return tower


def apply_lora(tower: EvaClipTower, spec: EvaClipFinetuneSpec) -> nn.Module:
    """Wrap `tower` in a peft LoRA model; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    lora_targets(tower, spec)  # refuses targets that match no linear
    prepare_for_lora(tower)
    lora = spec.method.lora
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_target_regex(spec), bias="none",
    )
    return get_peft_model(tower, config)


def freeze_for_partial(tower: EvaClipTower, trainable_blocks: int) -> None:
    """Freeze everything but the last `trainable_blocks` blocks and what follows them."""
    depth = tower.preset.depth
    if not 1 <= trainable_blocks <= depth:
        raise UserError(
            f"spec.method.partial.trainableBlocks: got {trainable_blocks}, but preset "
            f"{tower.preset.name} has {depth} blocks; use 1..{depth} or method.type full"
        )
    for name, param in tower.named_parameters():
        param.requires_grad_(partial_trains(name, depth, trainable_blocks))


def build_model(spec: EvaClipFinetuneSpec, tower: EvaClipTower, num_classes: int,
                seed: int) -> Classifier:
    """The trainable model of `spec`'s method around a materialised `tower`."""
    if spec.deepspeed.activation_checkpointing:
        tower.trunk.set_grad_checkpointing(True)
    method = spec.method.type
    wrapped: nn.Module = tower
    if method == "lora":
        wrapped = apply_lora(tower, spec)
    elif method == "partial":
        freeze_for_partial(tower, spec.method.partial.trainable_blocks)
    elif method == "full":
        tower.requires_grad_(True)
    else:
        raise UserError(f"spec.method.type: {method} is not a fine-tuning method here")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = Classifier(wrapped, tower.embed_dim, num_classes,
                           spec.training.normalize_features)
    return model


def trained_tower_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The trained tensors of the tower, named as in `EvaClipTower` (`trunk.*`)."""
    return {
        n: p.detach().cpu().contiguous()
        for n, p in model.tower.named_parameters()
        if p.requires_grad
    }


def save_sharded(state: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str],
                 shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write `state` as `model.safetensors`, or as shards plus an index past `shard_bytes`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {**metadata, "total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return paths


# --- the recipe ---------------------------------------------------------------------------


class FinetuneRecipe:
    """LoRA, partial or full fine-tuning of one job; see the module docstring."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.start_epoch = 0
        self.skip_batches = 0
        self.resumed_from: int | None = None

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        """Check the plan, build data, model and engine, and resume if a checkpoint exists."""
        require_fit(self.spec, processes=self.ctx.local_world_size)
        # DeepSpeed's ZeRO calls a deprecated torch.distributed name on every step.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*",
                                category=FutureWarning)
        if self.spec.model.precision == "fp16" and self.ctx.device.type != "cuda":
            raise UserError("spec.model.precision: fp16 needs GPUs; use bf16 or fp32 on CPU")
        self._write_pid_file()
        self._check_checkpoints()
        torch.manual_seed(self.spec.training.seed)
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._setup_checkpoints()

    def _write_pid_file(self) -> None:
        """Leave this rank's pid in the workdir, so operators (and tests) can find it."""
        path = Path(self.ctx.workdir) / PID_FILE.format(rank=self.ctx.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n")

    def _setup_data(self) -> None:
        from evaclip.models.presets import get_preset
        from evaclip.trainer.data import build_datasets, clip_transform, make_loader

        preset = get_preset(self.spec.model.preset)
        augment = clip_transform(preset, train=True) if self.spec.training.augment else None
        train, val, self.class_names = build_datasets(self.ctx, train_transform=augment)
        self.train_loader = make_loader(train, self.ctx, train=True)
        self.val_loader = make_loader(val, self.ctx, train=False)
        self.steps_per_epoch = math.ceil(
            len(self.train_loader) / self.spec.training.gradient_accumulation_steps
        )
        self.total_steps = self.steps_per_epoch * self.spec.training.epochs

    def _setup_model(self) -> None:
        from evaclip.models import build_tower, init_random_weights, load_weights

        spec = self.spec
        tower = build_tower(spec.model.preset, device="meta")
        if spec.model.weights:
            # DeepSpeed casts the module to the training precision anyway; casting while
            # loading avoids an fp32 copy of the whole tower per rank.
            load_weights(tower, spec.model.weights, format=spec.model.format,
                         storage=self.ctx.storage, dtype=_DTYPES[spec.model.precision],
                         trust_remote_code=spec.model.trust_remote_code)
        else:
            init_random_weights(tower, seed=spec.training.seed)
        self.tower = tower
        self.model = build_model(spec, tower, len(self.class_names), spec.training.seed)
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        if self.ctx.is_primary:
            log.info("Training %s of %s parameters (%s, method %s).", f"{trained:,}",
                     f"{total:,}", spec.model.preset, spec.method.type)

    def _setup_engine(self) -> None:
        import deepspeed

        t = self.spec.training
        groups = build_param_groups(
            self.model.tower.named_parameters(), self.model.head.named_parameters(),
            depth=self.tower.preset.depth, head_lr=t.learning_rate,
            backbone_lr=t.backbone_learning_rate, layer_decay=t.layer_decay,
            weight_decay=t.weight_decay,
        )
        optimizer = torch.optim.AdamW(optimizer_groups(groups), lr=t.learning_rate,
                                      betas=(0.9, 0.999))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.total_steps, t.warmup_fraction)
        )
        self.ds_config = render_deepspeed_config(self.spec, self.ctx.world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config,
        )
        self.dtype = _DTYPES[self.spec.model.precision]
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    def _check_checkpoints(self) -> None:
        """Refuse, before any weights are read, checkpoints under the output that another
        job wrote (see `CheckpointManager.check_job`)."""
        self.checkpoints = CheckpointManager(
            self.ctx.storage, self.ctx.output_uri, Path(self.ctx.workdir) / "checkpoints",
            keep_last=self.spec.checkpoint.keep_last, rank=self.ctx.rank,
            local_rank=self.ctx.local_rank, exclude_frozen=self.spec.method.type != "full",
            job=job_settings(self.spec, self.ctx.world_size),
        )
        self.checkpoints.check_job()

    def _setup_checkpoints(self) -> None:
        state = self.checkpoints.restore(self.engine)
        if state is None:
            return
        self.step = int(state["step"])
        self.start_epoch = int(state.get("epoch", 0))
        self.skip_batches = int(state.get("batch_in_epoch", 0))
        self.history = list(state.get("history", []))
        self.resumed_from = self.step
        if self.ctx.is_primary:
            log.info("Resumed at step %d (epoch %d, batch %d).", self.step,
                     self.start_epoch + 1, self.skip_batches)

    @torch.no_grad()
    def _measure_statistics(self, batches: int = 8) -> None:
        """Mean and std of the current embeddings of training images, over all ranks.

        Up to `batches` micro-batches per rank, taken in the order of epoch 0; every epoch
        re-seeds the sampler afterwards, so this leaves the training order untouched.
        """
        self.engine.eval()
        self.train_loader.sampler.set_epoch(0)
        sums = None
        for batch in itertools.islice(self.train_loader, batches):
            images = batch["images"].to(self.ctx.device, self.dtype)
            if not len(images):
                self._spare_forward(None, embed_only=True)
                continue
            z = self.engine.module.embed(images).double()
            part = torch.stack([z.sum(0), (z * z).sum(0), torch.full_like(z[0], len(z))])
            sums = part.cpu() if sums is None else sums + part.cpu()
        self.engine.train()
        sums = self._all_reduce(sums)
        mean = sums[0] / sums[2]
        std = (sums[1] / sums[2] - mean * mean).clamp_min(1e-12).sqrt()
        s = self.model.standardize
        s.mean.copy_(mean.to(s.mean.dtype))
        s.inv_std.copy_((1.0 / std.clamp_min(1e-6)).to(s.inv_std.dtype))

    # ---------------------------------------------------------------- training

    def train(self) -> None:
        """Run the remaining epochs: train, validate, checkpoint each epoch."""
        t = self.spec.training
        reporter = self.ctx.reporter
        per_step = t.batch_size * t.gradient_accumulation_steps * self.ctx.world_size
        reporter.begin("train", (self.total_steps - self.step) * per_step, unit="images",
                       span=(5.0, 95.0), epochs=t.epochs)
        for epoch in range(self.start_epoch, t.epochs):
            started = time.monotonic()
            losses, images = self._train_epoch(epoch)
            seconds = time.monotonic() - started
            top1, top5, val_loss = self.evaluate()
            record = {
                "epoch": epoch + 1, "step": self.step, "trainLoss": losses,
                "valLoss": val_loss, "valTop1": top1, "valTop5": top5,
                "learningRate": self._head_lr(), "imagesPerSecond": images / max(seconds, 1e-9),
            }
            self.history.append(record)
            reporter.set_metrics(train_loss=losses, val_top1=top1, val_top5=top5)
            if self.ctx.is_primary:
                log.info("Epoch %d of %d: train loss %.4f, validation top-1 %.4f, top-5 %.4f, "
                         "%.1f images/s.", epoch + 1, t.epochs, losses, top1, top5,
                         record["imagesPerSecond"])
            self.save_checkpoint(epoch + 1, 0)

    def _head_lr(self) -> float:
        groups = self.optimizer.param_groups
        return float(next(g["lr"] for g in groups if str(g.get("name", "")).startswith("head")))

    def _epoch_batches(self, epoch: int) -> Any:
        """This rank's batches of `epoch` in the job's fixed order, skipping those done."""
        self.train_loader.sampler.set_epoch(epoch)
        # Augmentation draws from torch's RNG (and workers' seeds from it): fix it per
        # epoch so a resumed epoch sees the same crops as the interrupted one.
        torch.manual_seed(self.spec.training.seed * 1000003 + epoch * 1009 + self.ctx.rank)
        batches = iter(self.train_loader)
        skip = self.skip_batches if epoch == self.start_epoch else 0
        return itertools.islice(batches, skip, None), skip

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        """One epoch; returns the mean training loss across ranks and the images seen."""
        batches, first = self._epoch_batches(epoch)
        every = self.spec.checkpoint.every_steps
        loss_sum = torch.zeros(2, dtype=torch.float64)
        seen = 0
        self.engine.train()
        for i, batch in enumerate(batches, start=first):
            images = batch["images"].to(self.ctx.device, self.dtype)
            labels = batch["labels"].to(self.ctx.device)
            loss = self.loss_fn(self.engine(images).float(), labels)
            self._stop_unless_finite(loss, epoch, i)
            self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.step()
            loss_sum += torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64)
            seen += len(labels)
            if not boundary:
                continue
            self.step += 1
            self.ctx.reporter.advance(len(labels) * self.ctx.world_size, epoch=epoch + 1,
                                      train_loss=float(loss.item()))
            if every and self.step % every == 0 and i + 1 < len(self.train_loader):
                self.save_checkpoint(epoch, i + 1)
        totals = self._all_reduce(loss_sum)
        return float(totals[0] / max(totals[1], 1)), int(totals[1])

    def _stop_unless_finite(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        """Stop every rank before a NaN or infinite loss reaches the weights.

        One all-reduce of a flag per micro-batch, so all ranks stop at the same step. The
        error is raised before backward and step: no checkpoint is ever saved after a
        non-finite loss, so the newest complete checkpoint is the last good one.
        """
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0])
        if not self._all_reduce(bad, max_=True).item():
            return
        last = self.checkpoints.latest()  # every rank: the first to fail tells the story
        kept = (f"the newest checkpoint, step {last}, is kept under "
                f"{self.checkpoints.root_uri}" if last is not None else "no checkpoint was saved")
        raise UserError(
            f"spec.training.learningRate: the training loss became non-finite (NaN or inf) "
            f"at step {self.step + 1} (epoch {epoch + 1}, batch {batch + 1}); the run stopped "
            f"and {kept}; lower training.learningRate / backboneLearningRate, set "
            "training.gradientClipping, or check spec.model.weights for NaN/inf values"
        )

    def _all_reduce(self, tensor: torch.Tensor, max_: bool = False) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if max_ else dist.ReduceOp.SUM)
        return tensor

    def _spare_forward(self, images: torch.Tensor | None, embed_only: bool = False) -> None:
        """A forward whose result is dropped, keeping ZeRO-3's collectives in step with
        ranks that still have images (the same modules as theirs run)."""
        if images is None:
            size = self.tower.preset.image_size
            images = torch.zeros(1, 3, size, size, device=self.ctx.device, dtype=self.dtype)
        if embed_only:
            self.engine.module.embed(images)
        else:
            self.engine(images)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, float]:
        """Validation top-1, top-5 and loss over the whole validation set (all ranks)."""
        self._measure_statistics()
        self.engine.eval()
        n_classes = len(self.class_names)
        sums = torch.zeros(4, dtype=torch.float64)  # top1, top5, loss, count
        confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64)
        k = min(5, n_classes)
        # Under ZeRO-3 every forward is collective: ranks with fewer validation batches
        # repeat a forward of their last images (not counted) until all ranks are done.
        rounds = self._all_reduce(torch.tensor([len(self.val_loader)]), max_=True).item()
        spare: torch.Tensor | None = None
        done = 0
        for batch in self.val_loader:
            done += 1
            if not len(batch["labels"]):
                self._spare_forward(spare)
                continue
            images = batch["images"].to(self.ctx.device, self.dtype)
            labels = batch["labels"].to(self.ctx.device)
            spare = images[:1]
            logits = self.engine(images).float()
            top = logits.topk(k, dim=-1).indices
            sums[0] += (top[:, 0] == labels).sum().item()
            sums[1] += (top == labels[:, None]).any(dim=-1).sum().item()
            sums[2] += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            sums[3] += len(labels)
            for true, pred in zip(labels.tolist(), top[:, 0].tolist(), strict=True):
                confusion[true, pred] += 1
        for _ in range(int(rounds) - done):
            self._spare_forward(spare)
        self.engine.train()
        s = self._all_reduce(sums)
        self.confusion = self._all_reduce(confusion).long().tolist()
        n = max(float(s[3]), 1.0)
        return float(s[0] / n), float(s[1] / n), float(s[2] / n)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        """Save the engine and the loop position (all ranks); see checkpointing.py."""
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "history": self.history}
        self.checkpoints.save(self.engine, self.step, state)

    # ---------------------------------------------------------------- outputs

    def _gathered(self, params: list[nn.Parameter]) -> Any:
        """A context in which `params` are whole on every rank (ZeRO-3 gathers them)."""
        import contextlib

        import deepspeed

        if self.ds_config["zero_optimization"]["stage"] == 3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def write_outputs(self, folder: Path | None) -> dict[str, str]:
        """Write the method's weights and the head into `folder` on rank 0 (None on the
        other ranks); every rank calls it, as gathering under ZeRO-3 is collective.

        Returns the artifacts written, relative to `folder` (empty on other ranks).
        """
        from safetensors.torch import save_file

        from evaclip.trainer.outputs import write_head

        method = self.spec.method.type
        meta = {"preset": self.spec.model.preset, "method": method}
        trained = [p for p in self.model.tower.parameters() if p.requires_grad]
        tower_state = self._full_tower_state() if method == "full" else None
        artifacts: dict[str, str] = {}
        with self._gathered(list(self.model.head.parameters()) +
                            (trained if method != "full" else [])):
            if folder is None:
                return artifacts
            weight, bias = self.model.folded_head()
            write_head(folder, self.ctx, weight, bias, self.class_names)
            artifacts["head"] = "head.safetensors"
            if method == "lora":
                self._save_adapter(folder / "adapter")
                artifacts["adapter"] = "adapter/"
            elif method == "partial":
                (folder / "weights").mkdir(parents=True, exist_ok=True)
                tensors = {k: v.float() for k, v in trained_tower_state(self.model).items()}
                save_file(tensors, str(folder / "weights" / "trained.safetensors"),
                          metadata=meta)
                artifacts["weights"] = "weights/trained.safetensors"
        if tower_state is not None and folder is not None:
            save_sharded(tower_state, folder / "weights", meta)
            artifacts["weights"] = "weights/"
        return artifacts

    def _full_tower_state(self) -> dict[str, torch.Tensor]:
        """The whole tower's tensors on rank 0 (gathered block by block under ZeRO-3)."""
        if self.ds_config["zero_optimization"]["stage"] == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        prefix = "tower."
        return {k[len(prefix):]: v.detach().cpu().contiguous()
                for k, v in (state or {}).items() if k.startswith(prefix)}

    def _save_adapter(self, folder: Path) -> None:
        from peft import get_peft_model_state_dict

        peft_model = self.model.tower
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(peft_model).items()}
        peft_model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)

    def finish(self) -> dict[str, Any]:
        """Write and publish the outputs (head, adapter or weights, metrics, curves)."""
        from evaclip.trainer.outputs import output_dir, publish, write_common_outputs

        self.ctx.reporter.stage("publish", percent=96.0)
        folder = output_dir(self.ctx) if self.ctx.is_primary else None
        if not self.history:
            raise RuntimeError("training ended without a validated epoch")
        last = self.history[-1]
        if not getattr(self, "confusion", None):
            self.evaluate()
        artifacts = self.write_outputs(folder)
        n = len(self.class_names)
        support = [sum(row) for row in self.confusion]
        metrics = {
            "method": self.spec.method.type, "preset": self.spec.model.preset,
            "randomWeights": not self.spec.model.weights,
            "top1": last["valTop1"], "top5": last["valTop5"], "topK": min(5, n),
            "perClassAccuracy": {
                name: (self.confusion[i][i] / support[i]) if support[i] else None
                for i, name in enumerate(self.class_names)
            },
            "confusionMatrix": self.confusion, "validationImages": int(sum(support)),
            "trainImages": len(self.train_loader.dataset), "classNames": self.class_names,
            "epochs": len(self.history), "steps": self.step, "resumedFromStep": self.resumed_from,
            "history": self.history, "finalTrainLoss": last["trainLoss"],
            "worldSize": self.ctx.world_size,
            "deepspeed": {"zeroStage": self.ds_config["zero_optimization"]["stage"]},
            "artifacts": artifacts,
        }
        if folder is not None:
            write_common_outputs(folder, self.ctx, metrics, self.class_names)
            publish(self.ctx, folder, extra={"method": self.spec.method.type,
                                             "top1": last["valTop1"]})
        self.ctx.barrier()
        return metrics

    def cleanup(self) -> None:
        """Drop the engine and the pid file."""
        path = Path(self.ctx.workdir) / PID_FILE.format(rank=self.ctx.rank)
        path.unlink(missing_ok=True)
        self.engine = None


def run(ctx: JobContext) -> dict[str, Any]:
    """Fine-tune the job of `ctx` end to end; returns the final metrics."""
    recipe = FinetuneRecipe(ctx)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        recipe.cleanup()
