"""Localized Region Contrast loss (Yan et al., MICCAI 2023).

[paper] Dense features are sampled inside Felzenszwalb super-pixels; samples of the same
super-pixel attract, samples of different super-pixels repel.

[ours] The exact form (see ``LRC_SPEC.md`` §1.4-1.5 and the README): per image, up to N
regions present in both views; per region and view, the mean of M sampled, L2-normalised
pixel embeddings (or full masked pooling); InfoNCE with temperature where the positive of a
view-1 region is the same region in view 2 and the negatives are every other valid region
of view 2 in the (global) batch, optionally also the other view-1 regions; symmetrised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_lightning.distributed import collectives as distributed
from lrc_lightning.objective.regions import (
    DownsampleMode,
    average_samples,
    check_region_ids,
    downsample_superpixels,
    gather_pixels,
    pool_regions,
    sample_region_pixels,
    select_regions,
)

__all__ = ["LocalizedRegionContrastLoss"]


class LocalizedRegionContrastLoss(nn.Module):
    """InfoNCE between super-pixel region embeddings of two views.

    Args:
        temperature: InfoNCE temperature tau (> 0).
        num_regions: N, region slots drawn per image (fixed shape, padded with invalid slots).
        samples_per_region: M, pixels averaged per region and view; ``None`` = masked
            average pooling over the whole region.
        min_pixels: a region must cover at least this many feature pixels in both views.
        downsample: how (B, H, W) maps are brought to the feature resolution:
            ``"nearest"`` or ``"majority"``.
        symmetric: average the view1->view2 and view2->view1 terms (else only the first).
        negatives_from_same_view: also use the anchor view's other regions as negatives.
        gather_distributed: gather regions from all processes so negatives span the global
            batch; gradients flow back to every rank.

    Shapes:
        features_v1, features_v2: (B, C, h, w) dense features: the embeddings themselves
        (normalised here per pixel), or the input of ``projector`` when one is given. 3D:
        (B, C, d, h, w), with (B, D, H, W) supervoxel maps; the same code path.
        superpixels_v1, superpixels_v2: (B, H, W) or (B, h, w) integer ids, -1 = ignore;
        equal ids in the two views denote the same region.
        Output: scalar.

    Bound on ids: every id is -1 (ignored) or in 0..P-1, P = the pixels (voxels) of one
    super-pixel map (H * W, or D * H * W): regions are counted in a table of P slots, one
    1-D scatter instead of a sort. Super-pixels numbered per image, or per 3D patch
    (:func:`lrc_lightning.data.patches.relabel_patch`, which ``LRCDataModule`` applies),
    always fit; ids numbered over a whole volume do not. An id beyond the bound raises a
    ValueError (:func:`~lrc_lightning.objective.regions.check_region_ids`) whenever the maps are in
    host memory, and on every device on the first batch that ``LRCMixin`` and
    ``LRCCallback`` see; maps on an accelerator are not read back on later steps (no host
    sync), where such ids are never counted: left out of the draw, never merged.

    ``projector`` (e.g. :class:`~lrc_lightning.DenseProjectionHead`) maps (B', C, *, *)
    features to embeddings. With sampling it runs on the N x M sampled pixels of both views
    only, not on the (B, C, h, w) maps (with the defaults, 16 regions x 16 pixels: 256 of
    the 65,536 pixels of a 256x256 map), and the same result per pixel since the head is
    1x1 (only its BatchNorm statistics are taken over the sampled pixels instead of all
    pixels). With ``samples_per_region=None`` it runs on the full maps. A projector with
    ``supports_sample_mask = True`` (the library's head) is also given the validity mask,
    so that only samples of existing regions (or, on full maps, pixels with an id) set its
    BatchNorm statistics.

    Under ``gather_distributed`` each rank returns ``sum of its anchors' losses * world_size
    / number of valid anchors in the global batch``, so that DDP's gradient averaging yields
    exactly the gradient of the global-batch loss, also when ranks hold different numbers of
    valid regions.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        num_regions: int = 16,
        samples_per_region: int | None = 16,
        min_pixels: int = 4,
        downsample: DownsampleMode = "nearest",
        symmetric: bool = True,
        negatives_from_same_view: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}")
        if samples_per_region is not None and samples_per_region < 1:
            raise ValueError(f"samples_per_region must be >= 1 or None, got {samples_per_region}")
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        if downsample not in ("nearest", "majority"):
            raise ValueError(f"downsample must be 'nearest' or 'majority', got {downsample!r}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True but torch.distributed is not available")
        self.temperature = temperature
        self.num_regions = num_regions
        self.samples_per_region = samples_per_region
        self.min_pixels = min_pixels
        self.downsample = downsample
        self.symmetric = symmetric
        self.negatives_from_same_view = negatives_from_same_view
        self.gather_distributed = gather_distributed

    def region_embeddings(
        self,
        features_v1: Tensor,
        features_v2: Tensor,
        superpixels_v1: Tensor,
        superpixels_v2: Tensor,
        generator: torch.Generator | None = None,
        projector: nn.Module | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fixed-shape region embeddings of both views.

        Returns:
            z1, z2: (B, N, D) L2-normalised region embeddings (slot n = the same region).
            valid: (B, N) bool.
        """
        if features_v1.shape != features_v2.shape or features_v1.ndim not in (4, 5):
            raise ValueError(
                "features_v1 and features_v2 must both be (B, C, h, w) or (B, C, d, h, w), "
                f"got {tuple(features_v1.shape)} and {tuple(features_v2.shape)}"
            )
        b, spatial = features_v1.shape[0], tuple(features_v1.shape[2:])
        layout = "(B, H, W)" if len(spatial) == 2 else "(B, D, H, W)"
        for name, maps in (("superpixels_v1", superpixels_v1), ("superpixels_v2", superpixels_v2)):
            if maps.ndim != len(spatial) + 1 or maps.shape[0] != b:
                raise ValueError(
                    f"{name} must be {layout} with B={b} for features "
                    f"{tuple(features_v1.shape)}, got {tuple(maps.shape)}"
                )
        maps_v1 = downsample_superpixels(superpixels_v1, spatial, self.downsample)
        maps_v2 = downsample_superpixels(superpixels_v2, spatial, self.downsample)
        # Per-image (per-patch) Felzenszwalb ids never reach the full-resolution pixel count:
        # a bound known without reading the data (see the class docstring).
        num_ids = max(superpixels_v1[0].numel(), superpixels_v2[0].numel())
        check_region_ids(superpixels_v1, num_ids, "superpixels_v1")
        check_region_ids(superpixels_v2, num_ids, "superpixels_v2")
        ids, valid = select_regions(
            maps_v1, maps_v2, self.num_regions, self.min_pixels, generator, num_ids
        )
        m = self.samples_per_region
        if m is None:
            if projector is not None:
                features_v1, features_v2 = _project(
                    projector, features_v1, features_v2, maps_v1 >= 0, maps_v2 >= 0
                )
            z1 = pool_regions(F.normalize(features_v1.float(), dim=1), maps_v1, ids, valid)
            z2 = pool_regions(F.normalize(features_v2.float(), dim=1), maps_v2, ids, valid)
            return z1, z2, valid
        samples_v1 = gather_pixels(
            features_v1, sample_region_pixels(maps_v1, ids, valid, m, generator)
        )
        samples_v2 = gather_pixels(
            features_v2, sample_region_pixels(maps_v2, ids, valid, m, generator)
        )
        if projector is not None:
            # (B, C, N*M) -> (B, C, N*M, 1): a 1x1-conv head sees the samples as an image.
            # Samples of empty slots are not real region pixels: masked out of its statistics.
            sampled = valid.repeat_interleave(m, dim=1).unsqueeze(-1)
            projected = _project(
                projector, samples_v1.unsqueeze(-1), samples_v2.unsqueeze(-1), sampled, sampled
            )
            samples_v1, samples_v2 = (p.squeeze(-1) for p in projected)
        return (
            average_samples(samples_v1.float(), valid),
            average_samples(samples_v2.float(), valid),
            valid,
        )

    def forward(
        self,
        features_v1: Tensor,
        features_v2: Tensor,
        superpixels_v1: Tensor,
        superpixels_v2: Tensor,
        generator: torch.Generator | None = None,
        projector: nn.Module | None = None,
    ) -> Tensor:
        device_type = features_v1.device.type
        # Similarities and log-sum-exp in fp32 even under autocast.
        with torch.autocast(device_type=device_type, enabled=False):
            z1, z2, valid = self.region_embeddings(
                features_v1, features_v2, superpixels_v1, superpixels_v2, generator, projector
            )
            return self.contrast(z1, z2, valid)

    def contrast(self, z1: Tensor, z2: Tensor, valid: Tensor) -> Tensor:
        """InfoNCE over region embeddings.

        Args:
            z1, z2: (B, N, D) normalised region embeddings of the two views.
            valid: (B, N) bool.
        """
        d = z1.shape[-1]
        a1, a2, v = z1.reshape(-1, d), z2.reshape(-1, d), valid.reshape(-1)
        if self.gather_distributed and distributed.is_distributed():
            g1, g2, gv = distributed.gather(a1), distributed.gather(a2), distributed.gather(v)
            world = distributed.world_size()
            offset = distributed.rank() * a1.shape[0]
        else:
            g1, g2, gv, world, offset = a1, a2, v, 1, 0
        total_valid = gv.sum()
        directions = [(a1, g2, g1), (a2, g1, g2)] if self.symmetric else [(a1, g2, g1)]
        loss_sum = a1.new_zeros(())
        for anchors, other_view, same_view in directions:
            loss_sum = loss_sum + self._direction(anchors, other_view, same_view, v, gv, offset)
        loss_sum = loss_sum / len(directions)
        # Global mean over valid anchors, scaled so that DDP's gradient average is exact.
        return loss_sum * world / total_valid.clamp(min=1).to(loss_sum.dtype)

    def _direction(
        self,
        anchors: Tensor,
        other_view: Tensor,
        same_view: Tensor,
        valid: Tensor,
        global_valid: Tensor,
        offset: int,
    ) -> Tensor:
        """Sum of per-anchor InfoNCE terms (anchors: (n, D); candidates: (G, D))."""
        n = anchors.shape[0]
        targets = torch.arange(n, device=anchors.device) + offset
        logits = anchors @ other_view.T / self.temperature
        logits = logits.masked_fill(~global_valid.unsqueeze(0), float("-inf"))
        if self.negatives_from_same_view:
            same = anchors @ same_view.T / self.temperature
            not_self = torch.ones_like(same, dtype=torch.bool)
            not_self[torch.arange(n, device=anchors.device), targets] = False
            same = same.masked_fill(~(global_valid.unsqueeze(0) & not_self), float("-inf"))
            logits = torch.cat([logits, same], dim=1)
        # Rows of invalid anchors may be all -inf: neutralise them before the log-softmax so
        # that neither the value nor the gradient turns into NaN, then drop them.
        logits = torch.where(valid.unsqueeze(1), logits, torch.zeros_like(logits))
        per_anchor = F.cross_entropy(logits, targets, reduction="none")
        return (per_anchor * valid.to(per_anchor.dtype)).sum()


def _project(
    projector: nn.Module, x1: Tensor, x2: Tensor, mask1: Tensor, mask2: Tensor
) -> tuple[Tensor, Tensor]:
    """Both views through the projector in one call, so that its BatchNorm sees both; a
    projector with ``supports_sample_mask`` also gets the (B, h, w) validity masks."""
    # The head computes in its own dtype (bf16 under precision="bf16-true"), the loss in fp32.
    weight = next(projector.parameters(), None)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    x = torch.cat([x1, x2]).to(dtype)
    if getattr(projector, "supports_sample_mask", False):
        out = projector(x, torch.cat([mask1, mask2]))
    else:
        out = projector(x)
    out = out.float()
    return out[: x1.shape[0]], out[x1.shape[0] :]
