"""Dense projection head for LRC."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from lrc_lightning.distributed.sync_batchnorm import MaskedBatchNorm

__all__ = ["DenseProjectionHead"]


class DenseProjectionHead(nn.Module):
    """1x1 conv -> BatchNorm -> ReLU -> 1x1 conv, applied at every pixel (or voxel).

    [ours] The paper projects decoder features before the local loss; this MLP-per-pixel
    form (as in MoCo v2's projector, made dense) is our choice. The output is normalised by
    the loss, not here, so that the head can be reused by other objectives.

    The BatchNorm is a :class:`~lrc_lightning.distributed.sync_batchnorm.MaskedBatchNorm`: given a
    ``mask``, only the valid positions set its statistics (the LRC loss passes the samples of
    existing regions), so ignored pixels neither shift the statistics nor get gradient.

    Shapes:
        features (B, in_channels, *spatial), mask (B, *spatial) bool or None
        -> (B, out_channels, *spatial); any number of spatial dims (2D maps, 3D volumes,
        or the loss's (B, C, N*M, 1) samples) goes through the same 1x1 layers.

    Args:
        in_channels: feature channels; ``None`` infers them from the first input (the first
            layer is lazy; run one forward, or a Trainer step, before building a DDP
            wrapper around it).
        hidden_channels: hidden size; ``None``: ``in_channels`` (``out_channels`` when
            ``in_channels`` is inferred).
        out_channels: embedding size.

    Raises:
        ValueError: a size below 1, or features of the wrong shape.

    Example:
        >>> import torch
        >>> head = DenseProjectionHead(8, out_channels=4)
        >>> x = torch.randn(2, 8, 3, 5)
        >>> mask = torch.zeros(2, 3, 5, dtype=torch.bool); mask[:, :, :2] = True
        >>> head(x, mask).shape
        torch.Size([2, 4, 3, 5])
    """

    supports_sample_mask = True

    def __init__(
        self,
        in_channels: int | None = None,
        hidden_channels: int | None = None,
        out_channels: int = 128,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if hidden_channels is None:
            hidden = in_channels if in_channels is not None else out_channels
        else:
            hidden = hidden_channels
        if hidden < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden}")
        self.in_channels = in_channels
        first: nn.Module = (
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
            if in_channels is not None
            else nn.LazyConv2d(hidden, kernel_size=1, bias=False)
        )
        self.layers = nn.Sequential(
            first,
            MaskedBatchNorm(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )
        self._warned_unmasked = False

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.in_channels is None:
            if features.ndim < 3:
                raise ValueError(f"expected (B, C, *spatial) features, got {tuple(features.shape)}")
            self.in_channels = int(features.shape[1])
        if features.ndim < 3 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (B, {self.in_channels}, *spatial) features, got {tuple(features.shape)}"
            )
        spatial = features.shape[2:]
        if features.ndim != 4:
            # Any spatial rank through the 2D 1x1 layers: (B, C, *S) -> (B, C, prod(S), 1).
            features = features.reshape(*features.shape[:2], -1, 1)
            mask = mask.reshape(mask.shape[0], -1, 1) if mask is not None else None
        return self._layers(features, mask).reshape(features.shape[0], -1, *spatial)

    def _layers(self, features: Tensor, mask: Tensor | None) -> Tensor:
        conv, norm, relu, out = self.layers
        x = conv(features)
        if isinstance(norm, MaskedBatchNorm):
            x = norm(x, mask)
        else:
            if mask is not None and not self._warned_unmasked:
                # Trainer(sync_batchnorm=True) swaps every BatchNorm for nn.SyncBatchNorm.
                warnings.warn(
                    f"the LRC head's BatchNorm was replaced by {type(norm).__name__}: its "
                    "statistics now include ignored samples; use "
                    "lrc_lightning.distributed.sync_batchnorm.GlobalBatchNormSync for "
                    "synchronised, masked statistics",
                    stacklevel=2,
                )
                self._warned_unmasked = True
            x = norm(x)
        return out(relu(x))
