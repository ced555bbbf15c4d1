"""Batch formats: where LRC finds the two views and their super-pixel maps in a batch.

LRC needs four tensors per training batch: the two views and their (B, H, W) super-pixel
maps. Modules keep their own batch structure; a :class:`BatchFormat` reads the four tensors
from it (and, for :class:`~lrc_lightning.LRCDataModule`, builds that structure):

* ``"dict"``: ``{"image_v1", "image_v2", "superpixels_v1", "superpixels_v2", ...}``
  (LRCDataModule's own batches, the reference models).
* ``"lightly"``: lightly's ``(views, targets, filenames)`` with the maps appended:
  ``([x1, x2], targets, filenames, [s1, s2])``.
* ``"solo-learn"``: solo-learn's ``(indexes, [x1, x2], targets)`` with the maps appended:
  ``(indexes, [x1, x2], targets, [s1, s2])``.

In the two tuple formats the maps travel as a fourth element that LRCCallback removes
before the module's ``training_step`` sees the batch, so that a lightly or solo-learn module
gets exactly the structure it was written for. Their ``targets`` are -1 (unlabelled, as
solo-learn marks its unlabelled data sets): a classifier loss must skip such a batch, since
``F.cross_entropy(logits, targets, ignore_index=-1)`` then averages over no target and is
NaN (solo-learn's online classifier; the guide gives the fix). Any other structure: a
:class:`KeyPathBatch` (dotted paths, ``"0.1"`` = ``batch[0][1]``) or a callable
``batch -> (x1, x2, s1, s2)``.

Example:
    >>> import torch
    >>> fmt = batch_format("lightly")
    >>> x, s = torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
    >>> batch = ([x, x + 1], torch.tensor([-1, -1]), ["a", "b"], [s, s])
    >>> float(fmt.inputs(batch).view_2.mean()), len(fmt.module_batch(batch))
    (1.0, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BATCH_FORMATS",
    "BatchFormat",
    "BatchFormatName",
    "CallableBatch",
    "KeyPathBatch",
    "LRCInputs",
    "batch_format",
]

BatchFormatName = Literal["dict", "lightly", "solo-learn"]


class LRCInputs(NamedTuple):
    """The four tensors LRC reads from a batch."""

    view_1: Tensor
    view_2: Tensor
    superpixels_1: Tensor
    superpixels_2: Tensor


class BatchFormat:
    """Reads :class:`LRCInputs` from a batch; says what the module's step receives."""

    name = "custom"

    def inputs(self, batch: Any) -> LRCInputs:
        raise NotImplementedError

    def module_batch(self, batch: Any) -> Any:
        """The batch as the wrapped module's ``training_step`` expects it."""
        return batch

    def targets(self, batch: Any) -> Tensor | None:
        """The class targets the module's step gets in ``batch`` (None: the format has none)."""
        return None

    def pack(self, batch: Mapping[str, Any]) -> Any:
        """Build this structure from LRCDataModule's dict batch (``image_v1``, ...)."""
        raise NotImplementedError(f"the {self.name!r} batch format cannot be built from a dict")


def _follow(batch: Any, path: str) -> Any:
    node = batch
    for part in path.split("."):
        try:
            if isinstance(node, Mapping):
                node = node[part]
            else:
                node = node[int(part)]
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise KeyError(
                f"LRC looked for {path!r} in the training batch and found no {part!r} in "
                f"{_describe(node)} (batch: {_describe(batch)}). Give LRCCallback/LRCMixin "
                "the batch_format that matches your batches ('dict', 'lightly', "
                "'solo-learn', a KeyPathBatch or a callable), or use LRCDataModule with "
                "the same batch_format."
            ) from err
    return node


def _describe(node: Any) -> str:
    if isinstance(node, Tensor):
        return f"Tensor{tuple(node.shape)}"
    if isinstance(node, Mapping):
        return "dict with keys " + str(sorted(map(str, node.keys())))
    if isinstance(node, (list, tuple)):
        inner = ", ".join(_describe(x) for x in node[:4]) + (", ..." if len(node) > 4 else "")
        return f"{type(node).__name__}[{inner}]"
    return type(node).__name__


def _as_tensor(value: Any, path: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"LRC expected a tensor at {path!r} of the batch, got {_describe(value)}")
    # MONAI's MetaTensor carries metadata that torch ops propagate: LRC needs plain tensors.
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _problems(inputs: LRCInputs) -> list[str]:
    """What makes ``inputs`` no pair of (B, C, *spatial) views with (B, *spatial) maps."""
    view_1, view_2, maps_1, maps_2 = inputs
    found = []
    for name, view in (("view_1", view_1), ("view_2", view_2)):
        if view.ndim not in (4, 5) or not view.is_floating_point():
            found.append(f"{name} is {view.dtype} {_describe(view)}, not (B, C, H, W) or "
                         "(B, C, D, H, W) images")  # fmt: skip
    if not found and view_1.shape[0] != view_2.shape[0]:
        found.append(f"the views' batch sizes differ: {_describe(view_1)}, {_describe(view_2)}")
    for name, maps in (("superpixels_1", maps_1), ("superpixels_2", maps_2)):
        if (
            maps.ndim != view_1.ndim - 1
            or maps.is_floating_point()
            or (maps.ndim and maps.shape[0] != view_1.shape[0])
        ):
            found.append(f"{name} is {maps.dtype} {_describe(maps)}, not integer maps of "
                         f"the views' batch and spatial size (one dim less than view_1's "
                         f"{_describe(view_1)})")  # fmt: skip
    return found


def _fits(fmt: BatchFormat, batch: Any) -> bool:
    try:
        read = fmt._read(batch) if isinstance(fmt, KeyPathBatch) else fmt.inputs(batch)
    except (KeyError, TypeError, ValueError, IndexError):
        return False
    return not _problems(read)


def _checked(fmt: BatchFormat, inputs: LRCInputs, batch: Any, paths: tuple[str, ...]) -> LRCInputs:
    """``inputs`` if they are two views and their maps; else an error naming the declared
    format, where it looked, the batch's structure, and the ready format that fits it."""
    found = _problems(inputs)
    if not found:
        return inputs
    fits = [
        name for name, make in BATCH_FORMATS.items() if name != fmt.name and _fits(make(), batch)
    ]
    advice = (
        f"The batch looks like a {fits[0]!r} batch: give batch_format={fits[0]!r} to "
        "LRCCallback / init_lrc (or build the batches with LRCDataModule(batch_format=...) "
        "of the declared format)."
        if fits
        else "Give LRCCallback / init_lrc the batch_format that matches your batches "
        "('dict', 'lightly', 'solo-learn', a KeyPathBatch or a callable)."
    )
    raise ValueError(
        f"batch_format {fmt.name!r} reads view_1, view_2, superpixels_1, superpixels_2 at "
        f"{list(paths)} of the training batch, but the batch is {_describe(batch)}: "
        + "; ".join(found)
        + ". "
        + advice
    )


class KeyPathBatch(BatchFormat):
    """Views and maps at dotted key paths; ``module_items`` keeps only the first items of a
    tuple batch for the module (the maps appended after them are LRC's).

    Args:
        views: paths of the two views (``"image_v1"``, ``"0.0"``).
        superpixels: paths of their (B, H, W) maps.
        module_items: for tuple batches, how many leading items the module receives.
        name: a name for messages.
    """

    def __init__(
        self,
        views: tuple[str, str] = ("image_v1", "image_v2"),
        superpixels: tuple[str, str] = ("superpixels_v1", "superpixels_v2"),
        module_items: int | None = None,
        name: str = "custom",
    ) -> None:
        if len(views) != 2 or len(superpixels) != 2:
            raise ValueError(f"give two view paths and two map paths, got {views}, {superpixels}")
        self.views = tuple(views)
        self.superpixels = tuple(superpixels)
        self.module_items = module_items
        self.name = name

    def inputs(self, batch: Any) -> LRCInputs:
        return _checked(self, self._read(batch), batch, (*self.views, *self.superpixels))

    def _read(self, batch: Any) -> LRCInputs:
        paths = (*self.views, *self.superpixels)
        return LRCInputs(*(_as_tensor(_follow(batch, p), p) for p in paths))

    def module_batch(self, batch: Any) -> Any:
        if self.module_items is None or isinstance(batch, Mapping):
            return batch
        return batch[: self.module_items]  # slicing keeps tuple or list

    def __repr__(self) -> str:
        return f"KeyPathBatch(views={self.views}, superpixels={self.superpixels})"


class _DictBatch(KeyPathBatch):
    def __init__(self) -> None:
        super().__init__(name="dict")

    def pack(self, batch: Mapping[str, Any]) -> Any:
        return dict(batch)


def _names(batch: Mapping[str, Any]) -> list[str]:
    cases, slices = batch.get("case_id"), batch.get("slice_index")
    if cases is None:
        return [str(i) for i in range(len(batch["image_v1"]))]
    if slices is None:
        return [str(c) for c in cases]
    return [f"{c}:{int(s)}" for c, s in zip(cases, slices, strict=True)]


def _targets_at(batch: Any, item: int) -> Tensor | None:
    found = batch[item] if isinstance(batch, (list, tuple)) and len(batch) > item else None
    return found if isinstance(found, Tensor) else None


class _LightlyBatch(KeyPathBatch):
    def __init__(self) -> None:
        super().__init__(("0.0", "0.1"), ("3.0", "3.1"), module_items=3, name="lightly")

    def targets(self, batch: Any) -> Tensor | None:
        return _targets_at(batch, 1)

    def pack(self, batch: Mapping[str, Any]) -> Any:
        views = [batch["image_v1"], batch["image_v2"]]
        # Unlabelled; on the views' device (LRCDataModule's device batches live there).
        targets = torch.full((len(views[0]),), -1, dtype=torch.long, device=views[0].device)
        return (views, targets, _names(batch), [batch["superpixels_v1"], batch["superpixels_v2"]])


class _SoloLearnBatch(KeyPathBatch):
    def __init__(self) -> None:
        super().__init__(("1.0", "1.1"), ("3.0", "3.1"), module_items=3, name="solo-learn")

    def targets(self, batch: Any) -> Tensor | None:
        return _targets_at(batch, 2)

    def pack(self, batch: Mapping[str, Any]) -> Any:
        views = [batch["image_v1"], batch["image_v2"]]
        b = len(views[0])
        # Unlabelled, as solo-learn's own unlabelled datasets mark them. Its online classifier
        # (cross_entropy with ignore_index=-1) averages over no target then: NaN; the
        # callback names that at the first step, the guide gives the 3-line fix.
        device = views[0].device
        targets = torch.full((b,), -1, dtype=torch.long, device=device)
        maps = [batch["superpixels_v1"], batch["superpixels_v2"]]
        return (torch.arange(b, device=device), views, targets, maps)


class CallableBatch(BatchFormat):
    """A user's function ``batch -> (view_1, view_2, superpixels_1, superpixels_2)``."""

    def __init__(self, read: Callable[[Any], Sequence[Tensor]]) -> None:
        self.read = read
        self.name = getattr(read, "__name__", "callable")

    def inputs(self, batch: Any) -> LRCInputs:
        values = tuple(self.read(batch))
        if len(values) != 4:
            raise ValueError(
                f"the batch format {self.name!r} must return (view_1, view_2, superpixels_1, "
                f"superpixels_2), got {len(values)} values"
            )
        read = LRCInputs(*(_as_tensor(v, f"{self.name}()[{i}]") for i, v in enumerate(values)))
        return _checked(self, read, batch, tuple(f"{self.name}()[{i}]" for i in range(4)))


#: The ready formats, by name.
BATCH_FORMATS: dict[str, Callable[[], BatchFormat]] = {
    "dict": _DictBatch,
    "lightly": _LightlyBatch,
    "solo-learn": _SoloLearnBatch,
}


def batch_format(spec: str | BatchFormat | Callable[[Any], Sequence[Tensor]]) -> BatchFormat:
    """One validator for every place that takes a batch format (name, instance, callable)."""
    if isinstance(spec, BatchFormat):
        return spec
    if isinstance(spec, str):
        if spec not in BATCH_FORMATS:
            raise ValueError(
                f"unknown batch_format {spec!r}; the ready formats are {sorted(BATCH_FORMATS)} "
                "(or pass a KeyPathBatch or a callable)"
            )
        return BATCH_FORMATS[spec]()
    if callable(spec):
        return CallableBatch(spec)
    raise TypeError(f"batch_format must be a name, a BatchFormat or a callable, got {spec!r}")
