"""The package's folders are its chapters, imported one way (docs/concepts/layout.md); the
module paths from before the folders keep working, with a DeprecationWarning."""

from __future__ import annotations

import ast
import configparser
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lrc_lightning import LRCConfig, _moved
from lrc_lightning.runtime.serialization import load_checkpoint

from .conftest import DEMO_MR, ROOT

PACKAGE = ROOT / "src" / "lrc_lightning"

#: The chapters, lowest first: a module may import only from its own chapter and lower ones.
LAYERS = ("runtime", "distributed", "objective", "superpixels", "data", "integrations",
          "models", "frameworks", "evaluation", "tools")  # fmt: skip
#: Modules beside the folders that import nothing of the package (every chapter may use them).
BASE = ("lrc_lightning._moved", "lrc_lightning._version")
#: The façade and the documented entry modules: for users; no module of the package imports
#: them (each entry module re-exports the module of the same name in its chapter).
FACADES = ("lrc_lightning", "lrc_lightning.cli", "lrc_lightning.lightning",
           "lrc_lightning.monai", "lrc_lightning.nnunet", "lrc_lightning.probe")  # fmt: skip


# ---------------------------------------------------------------------- the import graph
def _module_name(path: Path, package: Path) -> str:
    name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The package's modules that ``node`` imports (the submodule itself for ``from pkg
    import submodule``; the named module for ``importlib.import_module("...")``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                for a in node.names]
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
            == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):  # fmt: skip
        return [node.args[0].value]
    return []


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside a function
    (a lazy import still runs, so it counts), with the packages whose ``__init__`` such an
    import runs first (the ancestors of the target that are not the importer's own)."""
    paths = {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module, is_package, modules):
                if name != "lrc_lightning" and not name.startswith("lrc_lightning."):
                    continue
                while name not in modules and "." in name:  # an attribute of a module
                    name = name.rpartition(".")[0]
                found.add(name)
                parent = name.rpartition(".")[0]
                while parent.count(".") >= 1 and not module.startswith(parent + "."):
                    found.add(parent)
                    parent = parent.rpartition(".")[0]
        found.discard(module)
        graph[module] = found
    return graph


def chapter(module: str) -> str:
    if module in FACADES:
        return "façade"
    if module in BASE:
        return "base"
    return module.split(".")[1]


def layout_problems(package: Path) -> list[str]:
    """Everything that breaks the layout: a module outside the chapters, a chapter folder
    without its docstring, an import cycle, an import upwards, an import of the façade."""
    problems: list[str] = []
    graph = import_graph(package)
    rank = {name: i for i, name in enumerate(LAYERS)} | {"base": -1}
    for folder in sorted(p for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        if folder.name not in LAYERS:
            problems.append(f"folder {folder.name}/ is no chapter: place it in LAYERS")
        elif not init.exists() or not ast.get_docstring(ast.parse(init.read_text())):
            problems.append(f"{folder.name}/__init__.py has no docstring saying what the "
                            "chapter is")  # fmt: skip
    for path in sorted(package.glob("*.py")):
        module = _module_name(path, package)
        if module not in FACADES + BASE:
            problems.append(f"{module} lies beside the folders: move it into its chapter")
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if target not in graph:
                continue
            if chapter(target) == "façade":
                problems.append(f"{module} imports the façade {target}: import the module "
                                "that defines the name")  # fmt: skip
            elif chapter(module) == "base":
                problems.append(f"{module} (beside the folders) imports {target}")
            elif {chapter(module), chapter(target)} <= set(rank) and (  # else reported above
                    rank[chapter(target)] > rank[chapter(module)]):
                problems.append(f"{module} ({chapter(module)}/) imports {target} from the "
                                f"higher chapter {chapter(target)}/")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node] & set(graph)):
            if state.get(nxt) == 1:
                cycle = [*trail, node][[*trail, node].index(nxt):]
                problems.append("import cycle: " + " -> ".join([*cycle, nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return problems


def test_the_folders_are_chapters_imported_one_way() -> None:
    graph = import_graph(PACKAGE)
    # The walk sees lazy imports and the package __init__ files an import runs.
    assert "lrc_lightning.frameworks.nnunet" in graph["lrc_lightning.tools.cli"]  # lazy
    assert "lrc_lightning.models" in graph["lrc_lightning.evaluation.probe"]  # models/__init__
    assert "lrc_lightning.data" not in graph["lrc_lightning.data.cache"]  # its own package
    assert layout_problems(PACKAGE) == []


def test_a_planted_bad_import_is_found(tmp_path: Path) -> None:
    """The check fails on each kind of bad import (planted in a copy of the package)."""
    package = tmp_path / "lrc_lightning"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))

    def plant(relative: str, code: str) -> None:
        path = package / relative
        path.write_text(path.read_text() + textwrap.dedent(code))

    plant("runtime/processes.py", """
        def _lazy():
            from lrc_lightning.models.metrics import dice_per_organ
        """)
    plant("data/splits.py", "from lrc_lightning import LRCConfig\n")
    plant("objective/schedules.py", "import lrc_lightning.objective.term\n")  # term imports it
    plant("objective/__init__.py", "from lrc_lightning.integrations.mixin import LRCMixin\n")
    (package / "stray.py").write_text('"""A module beside the folders."""\n')
    (package / "extras").mkdir()
    (package / "extras" / "__init__.py").write_text("")
    problems = layout_problems(package)
    expected = [
        "lrc_lightning.runtime.processes (runtime/) imports lrc_lightning.models.metrics from "
        "the higher chapter models/",
        "lrc_lightning.data.splits imports the façade lrc_lightning: import the module",
        "lrc_lightning.objective (objective/) imports lrc_lightning.integrations.mixin from the "
        "higher chapter integrations/",
        "lrc_lightning.stray lies beside the folders",
        "folder extras/ is no chapter",
    ]
    for text in expected:
        assert any(text in problem for problem in problems), (text, problems)
    cycles = [set(p.removeprefix("import cycle: ").split(" -> "))
              for p in problems if p.startswith("import cycle: ")]
    assert {"lrc_lightning.objective.schedules", "lrc_lightning.objective.term"} in cycles
    # objective/__init__ -> integrations.mixin -> objective.term: runs objective/__init__ first
    assert any({"lrc_lightning.objective", "lrc_lightning.integrations.mixin"} <= c
               for c in cycles), problems  # fmt: skip


# ---------------------------------------------------------------------- the old module paths
def test_every_old_path_names_a_module_that_exists_and_no_file_shadows_it() -> None:
    for old, new in _moved.MOVED.items():
        assert (PACKAGE.parent / Path(*new.split("."))).with_suffix(".py").is_file(), new
        if not new.startswith(old + "."):  # a folder now: its __init__ forwards the names
            assert not (PACKAGE.parent / Path(*old.split("."))).with_suffix(".py").exists()


ENTRY_MODULES = {
    "lrc_lightning.cli": "lrc_lightning.tools.cli",
    "lrc_lightning.lightning": "lrc_lightning.frameworks.lightning",
    "lrc_lightning.monai": "lrc_lightning.frameworks.monai",
    "lrc_lightning.nnunet": "lrc_lightning.frameworks.nnunet",
    "lrc_lightning.probe": "lrc_lightning.evaluation.probe",
}


@pytest.mark.parametrize("entry", sorted(ENTRY_MODULES))
def test_documented_entry_modules_give_their_chapters_objects_without_a_warning(entry) -> None:
    try:
        module = importlib.import_module(ENTRY_MODULES[entry])
    except ImportError as err:  # the extra (monai, lightning) is not installed here
        pytest.skip(f"{ENTRY_MODULES[entry]} does not import here: {err}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shim = importlib.import_module(entry)
    assert not [w for w in caught if "has moved" in str(w.message)]
    assert shim.__all__ == module.__all__
    for name in module.__all__:
        assert getattr(shim, name) is getattr(module, name), name
    documented = {"lrc_lightning.nnunet": ["pretrain"], "lrc_lightning.cli": ["main"]}
    for name in documented.get(entry, []):  # documented, though not in __all__
        assert getattr(shim, name) is getattr(module, name)


def test_the_console_script_and_the_public_names_resolve() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    script = parser["options.entry_points"]["console_scripts"].strip()
    target = script.partition("=")[2].strip()
    assert target == "lrc_lightning.tools.cli:main"
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is importlib.import_module(
        "lrc_lightning.cli").main  # the old spelling too
    for package in ("lrc_lightning", "lrc_lightning.data", "lrc_lightning.models",
                    "lrc_lightning.superpixels"):  # fmt: skip
        public = importlib.import_module(package)
        assert all(hasattr(public, name) for name in public.__all__), package


_OLD_PATHS_SCRIPT = r"""
import importlib, json, sys, warnings
import lrc_lightning
warnings.simplefilter("always")
moved = lambda caught: [w for w in caught if "has moved" in str(w.message)]
out = {}
with warnings.catch_warnings(record=True) as caught:
    import lrc_lightning.term
    import lrc_lightning.term as again
from lrc_lightning.objective import term
out["same_module"] = lrc_lightning.term is term and again is term
out["term_warnings"] = [(str(w.message), w.filename, w.category.__name__) for w in moved(caught)]
with warnings.catch_warnings(record=True) as caught:
    from lrc_lightning.callback import LRCCallback
    from lrc_lightning.superpixels import _memory_limit, felzenszwalb
    from lrc_lightning.distributed import gather
    heads = lrc_lightning.heads  # an attribute of the package before, without an import
out["other_warnings"] = sorted(str(w.message).split(";")[0] for w in moved(caught))
from lrc_lightning.distributed import collectives
from lrc_lightning.integrations import callback
from lrc_lightning.objective import heads as new_heads
from lrc_lightning.superpixels import graph
out["same_objects"] = [LRCCallback is callback.LRCCallback is lrc_lightning.LRCCallback,
                       _memory_limit is graph._memory_limit, gather is collectives.gather,
                       heads is new_heads]
term.DEFAULT_LRC_WEIGHT_SEEN = "patched"  # monkeypatching either name patches the module
out["patched"] = importlib.import_module("lrc_lightning.term").DEFAULT_LRC_WEIGHT_SEEN
out["every_old_path"] = {old: importlib.import_module(old) is importlib.import_module(new)
                         for old, new in lrc_lightning._moved.MOVED.items()
                         if not new.startswith(old + ".")}
try:
    import lrc_lightning.no_such_module
except ModuleNotFoundError as err:
    out["unknown"] = str(err)
print(json.dumps(out))
"""


def test_old_module_paths_give_the_moved_module_and_warn_once(tmp_path: Path) -> None:
    """In a fresh interpreter (the warning comes with the first import of a path)."""
    script = tmp_path / "old_user_code.py"
    script.write_text(_OLD_PATHS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))  # this checkout
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["same_module"] is True
    # Once, naming the new path, attributed to the user's import line (not to _moved.py).
    assert out["term_warnings"] == [[
        "lrc_lightning.term has moved to lrc_lightning.objective.term; import it from there "
        "(the old path will be removed in a future release)", str(script), "DeprecationWarning"
    ]]  # fmt: skip
    assert out["other_warnings"] == [
        "lrc_lightning.callback has moved to lrc_lightning.integrations.callback",
        "lrc_lightning.distributed.gather has moved to "
        "lrc_lightning.distributed.collectives.gather",
        "lrc_lightning.heads has moved to lrc_lightning.objective.heads",
        "lrc_lightning.superpixels._memory_limit has moved to "
        "lrc_lightning.superpixels.graph._memory_limit",
    ]  # felzenszwalb: a name of the superpixels chapter, no warning
    assert out["same_objects"] == [True, True, True, True]
    assert out["patched"] == "patched"
    assert out["every_old_path"] == {old: True for old, new in _moved.MOVED.items()
                                     if not new.startswith(old + ".")}  # fmt: skip
    assert out["unknown"] == "No module named 'lrc_lightning.no_such_module'"


def test_a_config_naming_old_and_documented_paths_still_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``class_path`` values as users' configs have them: the reference model by its module
    path, the probe by its documented entry path (no warning), a logger by its old path."""
    from pytorch_lightning import LightningModule

    from lrc_lightning.evaluation.image_logging import SuperpixelViewLogger
    from lrc_lightning.evaluation.probe import SegmentationProbe
    from lrc_lightning.models.moco import MoCoV2LRC
    from lrc_lightning.tools.cli import LRCLightningCLI

    config = tmp_path / "old.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          accelerator: cpu
          logger: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: lrc_lightning.image_logging.SuperpixelViewLogger
              init_args: {{every_n_steps: 7}}
            - class_path: lrc_lightning.probe.SegmentationProbe
              init_args: {{every_n_epochs: 3}}
        model:
          class_path: lrc_lightning.models.moco.MoCoV2LRC
          init_args:
            backbone:
              class_path: lrc_lightning.models.unet.UNet2d
              init_args: {{width: 4, depth: 2}}
            lrc: {{weight: 0.5}}
        data:
          data: {DEMO_MR}
          cache_dir: {tmp_path / "cache"}
        """))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # as main() does: pytest's are not ours
    sys.modules.pop("lrc_lightning.image_logging", None)  # another test may have imported it
    _moved._warned.discard("lrc_lightning.image_logging")
    with pytest.warns(DeprecationWarning, match=r"^lrc_lightning\.image_logging has moved to "
                      r"lrc_lightning\.evaluation\.image_logging;") as caught:  # fmt: skip
        cli = LRCLightningCLI(args=["--config", str(config)], run=False)
    moved = [str(w.message) for w in caught if "has moved" in str(w.message)]
    assert len(moved) == 1  # the documented lrc_lightning.probe does not warn
    assert type(cli.model) is MoCoV2LRC and isinstance(cli.model, LightningModule)
    assert cli.model.lrc_config == LRCConfig(weight=0.5)
    loggers = [c for c in cli.trainer.callbacks if isinstance(c, SuperpixelViewLogger)]
    probes = [c for c in cli.trainer.callbacks if isinstance(c, SegmentationProbe)]
    assert [c.every_n_steps for c in loggers] == [7] and [p.every_n_epochs for p in probes] == [3]


def test_a_checkpoint_naming_the_old_module_path_loads_with_the_safe_loader(tmp_path) -> None:
    """A checkpoint written before the move pickles LRCConfig as lrc_lightning.term.LRCConfig:
    torch.load(weights_only=True) allows only registered names, so the old one is one too."""
    path = tmp_path / "old.ckpt"
    saved = LRCConfig(weight=0.5, num_regions=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pickle imports the old path
        LRCConfig.__module__ = "lrc_lightning.term"  # how the class was named then
        try:
            torch.save({"hyper_parameters": {"lrc": saved}}, path)
        finally:
            LRCConfig.__module__ = "lrc_lightning.objective.term"
    assert b"lrc_lightning.term\nLRCConfig" in path.read_bytes()  # the old name is in the file
    loaded = load_checkpoint(path)["hyper_parameters"]["lrc"]
    assert type(loaded) is LRCConfig and loaded == saved
