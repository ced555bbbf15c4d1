"""Which layer of a network gives LRC its dense features: list every submodule's output.

Example:
    >>> import torch
    >>> from lrc_lightning.models import UNet2d
    >>> layers = find_feature_layers(UNet2d(width=4, depth=2), torch.zeros(1, 1, 32, 32))
    >>> [(layer.name, layer.shape) for layer in dense_candidates(layers)][:2]
    [('decoders.1', (1, 4, 32, 32)), ('upsamplers.1', (1, 4, 32, 32))]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "LayerOutput",
    "dense_candidates",
    "find_feature_layers",
    "format_feature_layers",
    "format_layers",
    "print_feature_layers",
]


class LayerOutput(NamedTuple):
    """A submodule's name, class and output shape (of the first tensor when it returns a
    tuple or list: ``in_sequence``)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    in_sequence: bool = False

    @property
    def dense(self) -> bool:
        """(B, C, h, w) or (B, C, d, h, w): usable as LRC features."""
        return len(self.shape) in (4, 5)

    @property
    def spatial_size(self) -> int:
        return math.prod(self.shape[2:]) if self.dense else 0


def first_tensor(output: Any) -> Tensor | None:
    """A layer's output tensor, or the first of a tuple/list of outputs (else None)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


@torch.no_grad()
def find_feature_layers(module: nn.Module, example_input: Any) -> list[LayerOutput]:
    """Run ``module(example_input)`` once (eval mode, no gradients; the training mode is
    restored) and list each submodule's output shape, in call order.

    Args:
        module: any ``nn.Module`` (a LightningModule, a backbone, a MONAI network).
        example_input: a tensor (e.g. (2, 1, 128, 128)) or a tuple of positional inputs.

    Returns:
        One :class:`LayerOutput` per submodule call that returned a tensor (a submodule
        called twice appears twice).
    """
    found: list[LayerOutput] = []
    handles = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def record(_: nn.Module, __: Any, output: Any, name: str = name) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                kind, shape = type(_).__name__, tuple(tensor.shape)
                found.append(LayerOutput(name, kind, shape, tensor is not output))

        handles.append(sub.register_forward_hook(record))
    was_training = module.training
    module.eval()
    try:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        module(*args)
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def dense_candidates(layers: list[LayerOutput]) -> list[LayerOutput]:
    """The dense outputs, finest first (the largest spatial size; among equals, the later
    call, which is deeper in a decoder), each name once. A layer inside a listed block
    with the block's output shape is left out (the block names it; a block that returns
    several tensors names none of its layers)."""
    first: dict[str, tuple[int, LayerOutput]] = {}
    for position, layer in enumerate(layers):
        if layer.dense:
            first.setdefault(layer.name, (position, layer))
    shapes = {name: layer.shape for name, (_, layer) in first.items() if not layer.in_sequence}
    for name in list(first):
        parent = name.rsplit(".", 1)[0] if "." in name else None
        while parent is not None:
            if shapes.get(parent) == shapes[name]:
                del first[name]
                break
            parent = parent.rsplit(".", 1)[0] if "." in parent else None
    ranked = sorted(first.values(), key=lambda item: (-item[1].spatial_size, -item[0]))
    return [layer for _, layer in ranked]


def format_layers(layers: list[LayerOutput], limit: int = 12) -> str:
    """One ``name (Class) -> shape`` per line, at most ``limit`` lines."""
    lines = [f"  {layer.name} ({layer.kind}) -> {layer.shape}" for layer in layers[:limit]]
    if len(layers) > limit:
        lines.append(f"  ... {len(layers) - limit} more")
    return "\n".join(lines)


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """A module's structure: its submodules' names and classes, its parameters' shapes."""
    return (
        tuple((n, type(m).__name__) for n, m in module.named_modules()),
        tuple((n, tuple(p.shape)) for n, p in module.named_parameters()),
    )


def _copies(module: nn.Module, ran: set[str]) -> dict[str, str]:
    """Copies of a run submodule that ``forward`` does not run (a momentum or target branch:
    ``backbone_momentum`` of ``backbone``), as copy name -> original name. Matched by
    structure and parameter shapes; among several originals, the one whose name begins the
    copy's name, else the first."""
    subs = dict(module.named_modules())
    run = {name: _signature(subs[name]) for name in subs if name in ran}
    found: dict[str, str] = {}
    for name, sub in subs.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if not name or name in ran or (parent and parent not in ran):
            continue  # run, or inside a copy already looked at
        if not any(True for _ in sub.parameters()):
            continue  # a parameter-free layer (ReLU) would match any of its kind
        signature = _signature(sub)
        matches = [original for original, sig in run.items() if sig == signature]
        if matches:
            by_name = [m for m in matches if name.startswith(m)]
            found[name] = (by_name or matches)[0]
    return found


def format_feature_layers(module: nn.Module, example_input: Any = None) -> str:
    """The layers that can give LRC its dense features, finest first, as text: each
    ``name (Class) -> shape`` (one-pixel outputs, such as a pooled one, left out), with the
    layers of a momentum or target copy of the network that ``forward`` does not run
    (``backbone_momentum.2`` of ``backbone.2``: a ``target_layer`` for
    :class:`~lrc_lightning.LRCCallback`) right after the layer they copy (same shape, as
    the copy has the same structure).

    Args:
        module: any ``nn.Module``.
        example_input: an input for one forward (no gradients, eval mode); None takes the
            module's ``example_input_array``.

    Raises:
        ValueError: no example input, or no dense output for it.

    Example:
        >>> import torch
        >>> from lrc_lightning.models import UNet2d
        >>> print(format_feature_layers(UNet2d(width=4, depth=2), torch.zeros(1, 1, 32, 32))
        ...       .splitlines()[1])
          decoders.1 (ConvBlock) -> (1, 4, 32, 32)
    """
    if example_input is None:
        example_input = getattr(module, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            f"format_feature_layers({type(module).__name__}) needs an example_input (e.g. "
            "torch.zeros(2, 1, 128, 128)) or the module's example_input_array"
        )
    layers = find_feature_layers(module, example_input)
    # One feature pixel per image (a pooled output) leaves LRC nothing to contrast.
    candidates = [layer for layer in dense_candidates(layers) if layer.spatial_size > 1]
    shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else "the example"
    if not candidates:
        raise ValueError(
            f"{type(module).__name__} has no dense (B, C, h, w) or (B, C, d, h, w) output of "
            f"more than one pixel for an input of {shape}"
        )
    copies = _copies(module, {layer.name for layer in layers})
    lines = [f"Dense outputs of {type(module).__name__} for an input of {shape}, finest first:"]
    for layer in candidates:
        lines.append(f"  {layer.name} ({layer.kind}) -> {layer.shape}")
        for copy, original in copies.items():
            if layer.name == original or layer.name.startswith(original + "."):
                name = copy + layer.name[len(original) :]
                lines.append(f"  {name} ({layer.kind}) -> {layer.shape}  [copy of "
                             f"{layer.name}, not run by forward: a target_layer]")  # fmt: skip
    return "\n".join(lines)


def print_feature_layers(module: nn.Module, example_input: Any = None) -> None:
    """Print :func:`format_feature_layers`: which ``feature_layer`` (and ``target_layer``)
    to give :class:`~lrc_lightning.LRCCallback`.

    Args:
        module: any ``nn.Module``.
        example_input: an input for one forward; None takes ``example_input_array``.
    """
    print(format_feature_layers(module, example_input))
