"""Dense projection head for LRC."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DenseProjectionHead"]


class DenseProjectionHead(nn.Module):
    """1x1 conv -> BatchNorm -> ReLU -> 1x1 conv, applied at every pixel.

    [ours] The paper projects decoder features before the local loss; this MLP-per-pixel
    form (as in MoCo v2's projector, made dense) is our choice. The output is normalised by
    the loss, not here, so that the head can be reused by other objectives.

    Shapes:
        (B, in_channels, h, w) -> (B, out_channels, h, w)
    """

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
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (B, {self.in_channels}, h, w) features, got {tuple(features.shape)}"
            )
        return self.layers(features)
