"""Weights files are data: loading one never runs code from it (issue: safe loading)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lrc_lightning.models import FineTuneSegmentation, UNet2d
from lrc_lightning.models.weights import read_backbone_state
from lrc_lightning.runtime.serialization import UnsafeCheckpointError, load_checkpoint
from lrc_lightning.tools.cli import main
from lrc_lightning.tools.cli import main as cli_main


class RunsCode:
    """A pickle payload that writes a marker file when unpickled (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class Harmless:
    """A custom class: not code-running, but not an allowed global either."""

    def __init__(self, value: int) -> None:
        self.value = value


def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint with valid backbone weights and a code payload."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "downloaded.ckpt"
    state = {f"backbone.{k}": v for k, v in UNet2d(width=4, depth=2).state_dict().items()}
    torch.save(
        {"state_dict": state, "pytorch-lightning_version": "2.6.0", "payload": RunsCode(marker)},
        path,
    )
    return path, marker


def test_read_backbone_state_runs_nothing_and_names_file_and_global(tmp_path: Path) -> None:
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"downloaded\.ckpt.*'posix\.system'") as err:
        read_backbone_state(path)
    assert not marker.exists()
    assert err.value.path == path and err.value.offending_global == "posix.system"
    assert "trust_checkpoint=True" in str(err.value)


def test_pretrained_argument_runs_nothing(tmp_path: Path) -> None:
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"downloaded\.ckpt"):
        FineTuneSegmentation(UNet2d(width=4, depth=2), pretrained=str(path))
    assert not marker.exists()


def test_export_command_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, marker = malicious_checkpoint(tmp_path)
    out = tmp_path / "backbone.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(path), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "downloaded.ckpt" in err and "posix.system" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not out.exists()


def test_trust_checkpoint_is_the_explicit_opt_in(tmp_path: Path) -> None:
    state = {f"backbone.{k}": v for k, v in UNet2d(width=4, depth=2).state_dict().items()}
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": "2", "extra": Harmless(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"Harmless"):
        load_checkpoint(path)
    assert read_backbone_state(path, trust_checkpoint=True).keys() == {
        k[len("backbone.") :] for k in state
    }
    out = tmp_path / "b.pt"
    assert main(["export", "--ckpt", str(path), "--out", str(out), "--trust-checkpoint"]) == 0
    assert load_checkpoint(out).keys() == read_backbone_state(path, trust_checkpoint=True).keys()


def test_unreadable_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable PyTorch file"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_ckpt_path_of_the_cli_runs_nothing(tmp_path: Path) -> None:
    """`lrc-lightning test --ckpt_path` hands Lightning weights_only=True: a malicious
    checkpoint is refused before any of its code runs."""
    from tests.test_cli_configs import small_run

    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"downloaded\.ckpt.*'posix\.system'"):
        cli_main(["test", *small_run("finetune", tmp_path / "out", tmp_path / "cache",
                                     "--ckpt_path", str(path))])  # fmt: skip
    assert not marker.exists()


def test_trust_checkpoint_flag_reaches_lightning(tmp_path: Path) -> None:
    """With --trust-checkpoint the CLI gives Lightning weights_only=False: a checkpoint that
    needs a custom class gets past unpickling (and then fails for what it lacks), while
    without the flag it is refused at unpickling."""
    from tests.test_cli_configs import small_run

    path = tmp_path / "custom.ckpt"
    torch.save({"extra": Harmless(1)}, path)
    args = ["test", *small_run("finetune", tmp_path / "o", tmp_path / "c", "--ckpt_path",
                               str(path))]  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"custom\.ckpt.*Harmless"):
        cli_main(args)
    with pytest.warns(UserWarning, match="trusted checkpoint"), pytest.raises(Exception) as trusted:
        cli_main([*args, "--trust-checkpoint"])
    assert not isinstance(trusted.value, UnsafeCheckpointError)  # unpickled; fails on content
    assert "weights_only" not in str(trusted.value).lower().replace(" ", "_")
