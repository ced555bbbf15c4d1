"""MoCo v2 (He et al. 2020; Chen et al. 2020) as a LightningModule, with and without LRC."""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_lightning.distributed import collectives as distributed
from lrc_lightning.integrations.mixin import VIEW_KEYS, LRCMixin
from lrc_lightning.models.backbone import (
    backbone_features,
    dense_channels,
)
from lrc_lightning.models.backbone import global_channels as read_global_channels
from lrc_lightning.models.optim import (
    LRSchedule,
    OptimizerName,
    ReferenceModel,
    total_training_steps,
)
from lrc_lightning.models.unet import UNet2d
from lrc_lightning.objective.term import LRCConfig

__all__ = ["MoCoStepOutput", "MoCoV2", "MoCoV2LRC"]


class MoCoStepOutput(NamedTuple):
    loss: Tensor  # weighted global loss (0 when global_weight == 0)
    dense_v1: Tensor | None  # (B, C, h, w) query features of view 1, when asked for
    dense_v2: Tensor | None


def _flat(options: Any, prefix: str = "") -> dict[str, Any]:
    """Hyper-parameters as ``{"lrc.embedding_dim": 128, ...}`` (configs and dicts opened)."""
    if isinstance(options, LRCConfig):
        options = options.as_dict()
    if not isinstance(options, dict):
        return {prefix.rstrip("."): options}
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if not str(key).startswith("_"):  # LightningCLI's _class_path, _instantiator
            flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def _projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


class MoCoV2(ReferenceModel):
    """MoCo v2: query encoder + MLP projector, momentum key encoder, a queue of negatives.

    Symmetrised: both views are queries and keys. The key encoder is an exponential moving
    average updated once per *optimizer* step (so ``accumulate_grad_batches`` does not speed
    it up), optionally with a cosine schedule of the momentum towards ``final_momentum``.
    The queue takes the keys of all ranks. Queue, key encoder and step counters live in
    buffers and submodules, so a checkpoint restores them.

    Shuffle-BN (MoCo, He et al. 2020, §3.3): with the batch's own BatchNorm statistics in
    the key encoder, a query and its positive key share the statistics of one batch, and the
    contrastive task can be solved through them (the queue's negatives came from other
    batches). Keys are therefore computed on a random permutation of the batch, in
    ``key_bn_groups`` sub-batches that each have their own statistics, and put back in
    order; under DDP the permutation spans the images of all ranks (as in MoCo), and each
    rank encodes one share. With ``key_bn_groups=1`` on one process there is no shuffle. With
    synchronised BatchNorm (``sync_batchnorm`` / ``GlobalBatchNormSync``) a sub-batch's
    statistics span that sub-batch on every rank.

    Batches: ``image_v1``, ``image_v2`` (B, C, H, W), as LRCDataModule's pre-training mode.

    Args:
        backbone: any module; :class:`UNet2d` (default ``UNet2d()``) or one with the same
            ``encode``/``decode`` API gives its pooled bottleneck to the global branch.
        global_channels: channels of the pooled features (read from the backbone if None).
        projection_hidden_dim, projection_dim: MLP projector sizes.
        queue_size: negatives kept (MoCo v2: 65536 on ImageNet; small data needs fewer).
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        momentum, final_momentum: key encoder momentum, and its cosine target (None: fixed).
        global_weight: weight of the MoCo loss (0 leaves the global branch out: "LRC alone").
        key_bn_groups: sub-batches with their own BatchNorm statistics for the keys of each
            rank's share (shuffle-BN). When it does not divide the batch (an epoch's last
            batch), the sub-batches' sizes differ by one; a batch smaller than it gets one
            image per sub-batch.
        optimizer, lr, weight_decay, lr_schedule, warmup_steps: optimisation.
    """

    #: Subclasses that need dense (decoder) features of the query views set this.
    uses_dense_features: bool = False
    #: Decoder level handed to subclasses as dense features.
    dense_level: int = -1

    def __init__(
        self,
        backbone: nn.Module | None = None,
        global_channels: int | None = None,
        projection_hidden_dim: int = 512,
        projection_dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        final_momentum: float | None = None,
        global_weight: float = 1.0,
        key_bn_groups: int = 2,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "cosine",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for name, value in (("momentum", momentum), ("final_momentum", final_momentum)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if global_weight < 0:
            raise ValueError(f"global_weight must be >= 0, got {global_weight}")
        if key_bn_groups < 1:
            raise ValueError(f"key_bn_groups must be >= 1, got {key_bn_groups}")
        if global_weight == 0 and not self.uses_dense_features:
            raise ValueError("global_weight=0 leaves MoCoV2 with no loss; use MoCoV2LRC for LRC")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else UNet2d()
        self.temperature = temperature
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.global_weight = global_weight
        self.key_bn_groups = key_bn_groups
        if global_weight > 0:
            in_dim = read_global_channels(self.backbone, global_channels)
            self.projector = _projector(in_dim, projection_hidden_dim, projection_dim)
            # The key encoder is a copy that never gets gradients (not in the optimizer).
            self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
            queue = F.normalize(torch.randn(queue_size, projection_dim), dim=1)
            self.register_buffer("queue", queue)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("momentum_updates", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ global branch
    def query(self, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(N, D) normalised query embeddings (None without a global branch) and the dense
        features of ``dense_level`` when ``uses_dense_features``."""
        level = self.dense_level if self.uses_dense_features else None
        pooled, dense = backbone_features(self.backbone, images, level)
        if self.global_weight == 0:
            return None, dense
        return F.normalize(self.projector(pooled), dim=1), dense

    @torch.no_grad()
    def encode_keys(self, images: Tensor) -> Tensor:
        """(N, D) normalised key embeddings of ``images`` as one BatchNorm batch."""
        pooled, _ = backbone_features(self.key_backbone, images, None)
        return F.normalize(self.key_projector(pooled), dim=1)

    @torch.no_grad()
    def key(self, images: Tensor) -> Tensor:
        """(B, D) normalised key embeddings from the momentum encoder, with shuffle-BN.

        The images of all ranks are permuted, each rank encodes its share in
        ``key_bn_groups`` sub-batches, and the keys are returned in input order.
        """
        b = images.shape[0]
        # A batch that key_bn_groups does not divide (an epoch's last) gets sub-batches whose
        # sizes differ by one (tensor_split; chunk would make fewer, or leave one out); one
        # smaller than key_bn_groups gets one image per sub-batch.
        groups = min(self.key_bn_groups, b)
        if groups == 1 and not distributed.is_distributed():
            return self.encode_keys(images)
        everyone = distributed.gather(images)  # (world * B, ...) in rank order
        order = torch.randperm(everyone.shape[0], device=images.device)
        if distributed.is_distributed():
            torch.distributed.broadcast(order, src=0)  # one permutation on every rank
        share = order[distributed.rank() * b : (distributed.rank() + 1) * b]
        sub_batches = everyone[share].tensor_split(groups)
        shuffled = torch.cat([self.encode_keys(sub) for sub in sub_batches])
        keys = torch.empty(
            everyone.shape[0], shuffled.shape[1], dtype=shuffled.dtype, device=shuffled.device
        )
        keys[order] = distributed.gather(shuffled)  # back to input order
        return keys[distributed.rank() * b : (distributed.rank() + 1) * b]

    def contrast(self, query: Tensor, key: Tensor) -> Tensor:
        """InfoNCE of (B, D) queries against their (B, D) keys and the queue's negatives
        (random unit vectors until real keys replace them, as in MoCo)."""
        positives = (query * key).sum(dim=1, keepdim=True)
        negatives = query @ self.queue.clone().T
        logits = torch.cat([positives, negatives], dim=1) / self.temperature
        target = torch.zeros(len(query), dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write (N, D) keys of every rank at the queue pointer (wrapping around)."""
        size = self.queue.shape[0]
        if self._trainer is not None and self._trainer.world_size > 1:
            keys = self.all_gather(keys).reshape(-1, keys.shape[-1])
        keys = keys[-size:]
        # Pointer arithmetic on the device: no host sync.
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue.index_copy_(0, index, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def moco_step(self, batch: dict[str, Any]) -> MoCoStepOutput:
        """Global loss of a batch of two views, and the views' dense features if needed."""
        view_1, view_2 = batch[VIEW_KEYS[0]], batch[VIEW_KEYS[1]]
        b = view_1.shape[0]
        # One forward for both views: BatchNorm sees both, and the dense features come free.
        query, dense = self.query(torch.cat([view_1, view_2]))
        dense_v1, dense_v2 = dense.split(b) if dense is not None else (None, None)
        if query is None:
            return MoCoStepOutput(view_1.new_zeros(()), dense_v1, dense_v2)
        q1, q2 = query.split(b)
        k1, k2 = self.key(view_1), self.key(view_2)
        loss = 0.5 * (self.contrast(q1, k2) + self.contrast(q2, k1))
        self.enqueue(torch.cat([k1, k2]))
        if self._trainer is not None:
            self.log("train/moco_loss", loss.detach(), prog_bar=True, batch_size=b)
        return MoCoStepOutput(self.global_weight * loss, dense_v1, dense_v2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.moco_step(batch).loss

    # ------------------------------------------------------------------ momentum encoder
    def current_momentum(self) -> float:
        if self.final_momentum is None or self._trainer is None:
            return self.momentum
        total = total_training_steps(self.trainer)
        progress = min(1.0, self.trainer.global_step / max(1, total))
        return (
            self.final_momentum
            - (self.final_momentum - self.momentum) * (math.cos(math.pi * progress) + 1) / 2
        )

    @torch.no_grad()
    def update_key_encoder(self) -> None:
        m = self.current_momentum()
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.key_backbone.parameters(), *self.key_projector.parameters()]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, [p.detach() for p in online], alpha=1.0 - m)
        for online_buffer, target_buffer in zip(
            self.backbone.buffers(), self.key_backbone.buffers(), strict=True
        ):
            target_buffer.copy_(online_buffer)  # BN running stats follow the online encoder
        self.momentum_updates += 1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming with other sizes (``projection_dim``, ``queue_size``, the backbone's):
        an error naming the hyper-parameters that differ, not a state_dict size mismatch."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("state_dict", {})
        mismatched = [
            f"{name} {tuple(saved[name].shape)} in the checkpoint, {tuple(value.shape)} now"
            for name, value in self.state_dict().items()
            if isinstance(saved.get(name), Tensor)
            and not nn.parameter.is_lazy(value)
            and saved[name].shape != value.shape
        ]
        if not mismatched:
            return
        before = _flat(checkpoint.get("hyper_parameters", {}))
        now = _flat(dict(self.hparams))
        named = [f"{k}={before[k]!r} in the checkpoint, {now[k]!r} now"
                 for k in sorted(now) if k in before and before[k] != now[k]]  # fmt: skip
        raise ValueError(
            f"cannot resume {type(self).__name__} from this checkpoint: "
            f"{len(mismatched)} weight(s) have other shapes ("
            + "; ".join(mismatched[:4])
            + ("; ..." if len(mismatched) > 4 else "")
            + ")"
            + (f"; the hyper-parameters that differ: {'; '.join(named)}" if named else "")
            + ". Resume with the checkpoint's options, or start a new run (without "
            "ckpt_path) that loads the backbone's weights only."
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Called once per optimizer step (every n batches under accumulate_grad_batches=n),
        # and before any on_train_batch_end hook, so a checkpoint taken at this step already
        # holds the updated key encoder (resuming does not skip an update).
        super().optimizer_step(*args, **kwargs)
        if self.global_weight > 0:
            self.update_key_encoder()


class MoCoV2LRC(LRCMixin, MoCoV2):
    """MoCo v2 + LRC: the paper's pre-training. The LRC term uses the query encoder's
    decoder features of both views from the same forward pass as the global branch, so
    it costs a projection head and the loss. ``global_weight=0`` gives "LRC alone".

    Batches also need ``superpixels_v1``/``superpixels_v2`` (LRCDataModule, pre-training).

    Args:
        lrc: LRC options (:class:`~lrc_lightning.LRCConfig`); the rest as :class:`MoCoV2`.
        lrc_feature_channels: channels of the chosen decoder level (read from the backbone
            if None).
    """

    uses_dense_features = True

    def __init__(
        self,
        backbone: nn.Module | None = None,
        lrc: LRCConfig | None = None,
        lrc_feature_channels: int | None = None,
        **moco_kwargs: Any,
    ) -> None:
        lrc = lrc if lrc is not None else LRCConfig()
        self.dense_level = lrc.feature_level
        super().__init__(backbone=backbone, **moco_kwargs)
        channels = dense_channels(self.backbone, lrc.feature_level, lrc_feature_channels)
        self.init_lrc(feature_channels=channels, config=lrc)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.moco_step(batch)
        assert out.dense_v1 is not None and out.dense_v2 is not None
        lrc = self.lrc_loss(
            out.dense_v1, out.dense_v2, batch["superpixels_v1"], batch["superpixels_v2"]
        )
        return out.loss + lrc
