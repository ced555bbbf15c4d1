"""Move backbone weights between pre-training, plain PyTorch and fine-tuning."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lrc_lightning.runtime.serialization import load_checkpoint

__all__ = ["BACKBONE_PREFIX", "export_backbone", "load_backbone_weights", "read_backbone_state"]

#: Where the reference models keep the trained (query) backbone in their state dict.
BACKBONE_PREFIX = "backbone."


def _list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_backbone_state(
    path: str | Path, prefix: str = BACKBONE_PREFIX, trust_checkpoint: bool = False
) -> dict[str, Tensor]:
    """Backbone weights from a Lightning checkpoint (keys under ``prefix``) or from a file
    written by :func:`export_backbone` / ``torch.save(backbone.state_dict())``.

    Loaded with the safe loader (:func:`lrc_lightning.runtime.serialization.load_checkpoint`): no
    code from the file runs unless ``trust_checkpoint=True``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs a global that the safe loader refuses.
        ValueError: unreadable, or neither a checkpoint nor a state_dict, naming the file.
    """
    return _backbone_state(load_checkpoint(path, trust_checkpoint=trust_checkpoint), path, prefix)


def _backbone_state(obj: Any, path: str | Path, prefix: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and "pytorch-lightning_version" in obj:
        full = obj["state_dict"]
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        if not state:
            tops = sorted({k.split(".")[0] + "." for k in full})
            raise ValueError(
                f"{path}: a Lightning checkpoint with no key under {prefix!r}; its top-level "
                f"prefixes are {tops}. Pass the right prefix."
            )
        return state
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError(
        f"{path}: neither a Lightning checkpoint nor a state_dict of tensors "
        f"(got {type(obj).__name__})"
    )


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    prefix: str = BACKBONE_PREFIX,
    trust_checkpoint: bool = False,
) -> None:
    """Load weights into ``backbone`` with a strict check of names and shapes.

    Raises:
        ValueError: naming the file and listing missing, unexpected and mis-shaped keys.
        UnsafeCheckpointError: the file needs code to load (see :func:`read_backbone_state`).
    """
    state = read_backbone_state(path, prefix, trust_checkpoint)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{path}: weights do not match {type(backbone).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatch (file vs model): {_list(mis_shaped)}")
        parts.append("Is the backbone configured as in pre-training (width, depth, norm)?")
        raise ValueError("\n  ".join(parts))
    backbone.load_state_dict(state, strict=True)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_backbone(
    checkpoint: str | Path,
    output: str | Path,
    prefix: str = BACKBONE_PREFIX,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the backbone of a pre-training checkpoint as a plain ``state_dict`` file.

    Next to it, ``<output>.json`` records the source checkpoint and, when the checkpoint
    knows it, the backbone's class and arguments, so that plain PyTorch can rebuild it::

        backbone = UNet2d(**json.load(open("backbone.pt.json"))["backbone"]["init_args"])
        backbone.load_state_dict(torch.load("backbone.pt"))
    """
    output = Path(output)
    saved = load_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    state = _backbone_state(saved, checkpoint, prefix)
    meta = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "prefix": prefix,
        "backbone": saved.get("backbone_config") if isinstance(saved, Mapping) else None,
        "num_tensors": len(state),
    }
    _atomic_write(output, lambda tmp: torch.save(state, tmp))
    meta_path = output.with_name(output.name + ".json")
    _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return output
