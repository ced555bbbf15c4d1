"""Sphinx extension: every public name of the package has a docstring and is documented.

Autodoc leaves out a member without a docstring without a word, so a public name could
vanish from the API reference unnoticed. This extension warns (``-W`` makes it an error):

* for every name in the ``__all__`` of a module in ``public_modules`` that has no
  docstring (classes and functions: ``inspect.getdoc``; constants: a ``#:`` comment, as
  autodoc reads them);
* for every public method or property defined by such a class without a docstring, except
  those in ``KNOWN_UNDOCUMENTED`` (a list that may only shrink);
* for every module in ``public_modules`` that no page documents with ``automodule``.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Modules whose ``__all__`` is the public API (the API reference documents each).
PUBLIC_MODULES = (
    "lrc_lightning",
    "lrc_lightning.data",
    "lrc_lightning.models",
    "lrc_lightning.frameworks.monai",
    "lrc_lightning.frameworks.nnunet",
    "lrc_lightning.frameworks.lightning",
    "lrc_lightning.evaluation.label_efficiency",
    "lrc_lightning.evaluation.statistics",
    "lrc_lightning.evaluation.decision",
)

#: Public methods that had no docstring when this check was written (``Class.method`` of
#: the defining module). Add a docstring and remove the entry; never add one.
KNOWN_UNDOCUMENTED = frozenset({
    "lrc_lightning.objective.batches.KeyPathBatch.inputs",
    "lrc_lightning.objective.term.LRCConfig.as_dict",
    "lrc_lightning.data.cache.VolumeCache.key",
    "lrc_lightning.data.cache.VolumeCache.entry_dir",
    "lrc_lightning.data.cache.VolumeCache.load",
    "lrc_lightning.models.moco.MoCoV2.current_momentum",
    "lrc_lightning.models.moco.MoCoV2.update_key_encoder",
    "lrc_lightning.models.segmentation.SupervisedSegmentation.segmentation_loss",
    "lrc_lightning.models.segmentation.SupervisedSegmentation.batch_views",
    "lrc_lightning.models.unet.UNet2d.forward_features",
    "lrc_lightning.evaluation.label_efficiency.Benchmark.num_classes",
    "lrc_lightning.evaluation.label_efficiency.Benchmark.datamodule",
    "lrc_lightning.evaluation.label_efficiency.Benchmark.backbone",
    "lrc_lightning.evaluation.label_efficiency.Benchmark.trainer",
    "lrc_lightning.evaluation.label_efficiency.Benchmark.phase",
    "lrc_lightning.evaluation.label_efficiency.Variant.label",
})

# Names that are not documented by a docstring by design.
_EXEMPT = frozenset({"__version__"})


def _attribute_doc(module_name: str, name: str) -> str:
    analyzer = ModuleAnalyzer.for_module(module_name)
    return "\n".join(analyzer.find_attr_docs().get(("", name), [])).strip()


def _constant_doc(module_name: str, name: str, obj: Any) -> str:
    """The ``#:`` comment of a constant, in its module or the submodule it comes from."""
    homes = [module_name, *sorted(
        other for other, module in list(sys.modules.items())
        if other.startswith(module_name + ".") and getattr(module, name, None) is obj)]
    for home in homes:
        doc = _attribute_doc(home, name)
        if doc:
            return doc
    return ""


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    problems: list[str] = []
    public = getattr(module, "__all__", None)
    if public is None:
        return [f"{module_name} has no __all__: its public names are undeclared"]
    for name in public:
        if name in _EXEMPT:
            continue
        obj: Any = getattr(module, name)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            if not inspect.getdoc(obj):
                problems.append(f"{module_name}.{name} has no docstring")
        elif not _constant_doc(module_name, name, obj):
            problems.append(f"{module_name}.{name} has no '#:' doc comment")
        if inspect.isclass(obj):
            problems += _undocumented_members(obj)
    return problems


def _undocumented_members(cls: type) -> list[str]:
    problems = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if not (inspect.isfunction(value) or isinstance(value, (property, classmethod,
                                                                  staticmethod))):
            continue
        qualified = f"{cls.__module__}.{cls.__qualname__}.{name}"
        if inspect.getdoc(getattr(cls, name)) or qualified in KNOWN_UNDOCUMENTED:
            continue
        problems.append(f"{qualified} (public) has no docstring")
    return problems


def _check(app: Sphinx, env: Any) -> None:
    for module_name in PUBLIC_MODULES:
        for problem in sorted(set(_undocumented(module_name))):
            logger.warning(f"public API: {problem}", type="public_docstrings")
    documented = getattr(env, "lrc_documented_modules", set())
    for module_name in PUBLIC_MODULES:
        if module_name not in documented:
            logger.warning(f"public API: no page documents {module_name} (automodule)",
                           type="public_docstrings")
    # Every public name must be in the reference under some name (the same object).
    in_reference = set()
    for name in env.get_domain("py").objects:
        found, obj = _import_target(name) if name.startswith("lrc_lightning") else (False, None)
        if found:
            in_reference.add(id(obj))
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            if name not in _EXEMPT and id(getattr(module, name)) not in in_reference:
                logger.warning(f"public API: {module_name}.{name} is in no page of the API "
                               "reference", type="public_docstrings")


def _record(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list) -> None:
    if what == "module":
        documented = getattr(app.env, "lrc_documented_modules", None)
        if documented is None:
            documented = app.env.lrc_documented_modules = set()
        documented.add(name)


def _merge(app: Sphinx, env: Any, docnames: Any, other: Any) -> None:
    env.lrc_documented_modules = (getattr(env, "lrc_documented_modules", set())
                                  | getattr(other, "lrc_documented_modules", set()))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _record)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check)
    _setup_resolver(app)
    app.connect("autodoc-process-docstring", _escape_shape_stars)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# --- References to lrc_lightning objects by another path -------------------------------
#
# Docstrings name objects where they are defined (``lrc_lightning.superpixels.graph.felzenszwalb``)
# while the reference documents them where users import them (``lrc_lightning.felzenszwalb``).
# A reference that Sphinx cannot resolve is therefore looked up by *object*: if the target
# exists and a documented name is the same object, the reference links there; if it exists
# but is internal (not documented), it stays plain text; if it does not exist at all, the
# warning stands: that is a broken reference (a renamed or deleted object).


def _import_target(target: str) -> tuple[bool, Any]:
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False, None
        return True, obj
    return False, None


def _resolve_by_object(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("lrc_lightning"):
        return None
    found, obj = _import_target(target)
    if not found:
        return None  # a broken reference: Sphinx warns
    domain = env.get_domain("py")
    for name, entry in domain.objects.items():
        if entry.aliased or not name.startswith("lrc_lightning"):
            continue
        documented_found, documented = _import_target(name)
        if documented_found and documented is obj and name != target:
            return domain.resolve_xref(env, node["refdoc"], app.builder, entry.objtype, name,
                                       node, contnode)
    return contnode  # exists, but internal: plain text


def _setup_resolver(app: Sphinx) -> None:
    app.connect("missing-reference", _resolve_by_object)


# --- Shapes in docstrings ----------------------------------------------------------------
#
# The package writes tensor shapes as plain text, ``(B, C, *spatial)`` and ``(B, C, *)``;
# reStructuredText would read each ``*`` there as the start of an emphasis and warn. A star
# that opens a shape entry (after "(", "[", ", " and before the entry's "," / ")" / "]") is
# escaped; a real emphasis (``*sample*``) and inline literals are left alone.

_SHAPE_STAR = re.compile(r"(?<=[(\[, ])\*(?=[\w']*[,)\]])")
_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_shape_stars(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                        lines: list[str]) -> None:
    for i, line in enumerate(lines):
        if "*" not in line or line.lstrip().startswith(">>>"):
            continue
        parts = _LITERAL.split(line)
        lines[i] = "".join(part if j % 2 else _SHAPE_STAR.sub(r"\\*", part)
                           for j, part in enumerate(parts))
