"""Dense projection head for LRC."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from lrc_lightning.sync_batchnorm import MaskedBatchNorm

__all__ = ["DenseProjectionHead"]


class DenseProjectionHead(nn.Module):
    """1x1 conv -> BatchNorm -> ReLU -> 1x1 conv, applied at every pixel.

    [ours] The paper projects decoder features before the local loss; this MLP-per-pixel
    form (as in MoCo v2's projector, made dense) is our choice. The output is normalised by
    the loss, not here, so that the head can be reused by other objectives.

    The BatchNorm is a :class:`~lrc_lightning.sync_batchnorm.MaskedBatchNorm`: given a
    ``mask``, only the valid positions set its statistics (the LRC loss passes the samples of
    existing regions), so ignored pixels neither shift the statistics nor get gradient.

    Shapes:
        features (B, in_channels, h, w), mask (B, h, w) bool or None
        -> (B, out_channels, h, w)

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
        self, in_channels: int, hidden_channels: int | None = None, out_channels: int = 128
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        hidden = in_channels if hidden_channels is None else hidden_channels
        if hidden < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden}")
        self.in_channels = in_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            MaskedBatchNorm(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )
        self._warned_unmasked = False

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (B, {self.in_channels}, h, w) features, got {tuple(features.shape)}"
            )
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
                    "lrc_lightning.sync_batchnorm.GlobalBatchNormSync for synchronised, "
                    "masked statistics",
                    stacklevel=2,
                )
                self._warned_unmasked = True
            x = norm(x)
        return out(relu(x))
