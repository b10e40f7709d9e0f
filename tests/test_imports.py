"""The import rules of docs/architecture.md, checked on the source with ``ast`` (lazy imports included):

* layers: ``nn → diffusion → models → callbacks → entry points``; a layer imports nothing from a
  layer to its right, and nothing in ``genlab`` imports the entry points;
* ``data``, ``metrics``, ``evaluation`` and ``utils`` import nothing from ``models`` (nor
  ``callbacks``) but the model contract, ``genlab.models.contract``;
* ``nn`` imports neither ``genlab.utils.checkpoint`` nor ``genlab.models`` (a pretrained part is
  read from its checkpoint file, not rebuilt as a LightningModule);
* ``callbacks``, ``metrics`` and ``evaluation`` import no specific dataset module
  (``genlab.data.shapes``, ``coco``, ...): what a dataset provides is injected;
* a model family (``genlab.models.<family>``) imports no other family, only the contract
  (``genlab.models.contract``, which imports nothing from genlab) and its own folder;
* only ``genlab.utils`` (and the entry points) import ``hydra`` or ``omegaconf``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

SRC = ROOT / "src"
LAYERS = ["nn", "diffusion", "models", "callbacks"]
ENTRY_POINTS = {"train", "eval", "sample"}
NO_MODELS = {"data", "metrics", "evaluation", "utils"}
NO_DATASETS = {"callbacks", "metrics", "evaluation"}
DATASETS = {"shapes", "coco", "mnist", "cifar10", "digits", "image_folder", "webdataset"}
CONFIG_LIBRARIES = {"hydra", "omegaconf"}
CONTRACT = "genlab.models.contract"
FAMILIES = {  # genlab.models.<family>: one folder per family of the lineage
    "autoencoders",
    "autoregressive",
    "diffusion",
    "adversarial",
    "flows",
    "evaluators",
}


def module_name(path: Path) -> str:
    """``src/genlab/nn/unet.py`` → ``genlab.nn.unet``; a package's ``__init__`` is the package."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module that ``source`` imports anywhere (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def violations(module: str, imports: set[str]) -> list[str]:
    """The import rules that ``module`` (importing ``imports``) breaks."""
    parts = module.split(".")
    if parts[0] != "genlab":
        return []
    sub = parts[1] if len(parts) > 1 else ""
    found = []
    for name in sorted(imports):
        top, _, rest = name.partition(".")
        target = rest.split(".")[0] if top == "genlab" else ""
        if top in CONFIG_LIBRARIES and sub != "utils":
            found.append(f"{module} imports {name}: only genlab.utils may touch Hydra/OmegaConf")
        if top in ENTRY_POINTS:
            found.append(f"{module} imports the entry point {name}")
        if sub in LAYERS and target in LAYERS and LAYERS.index(target) > LAYERS.index(sub):
            found.append(f"{module} imports {name}: {sub} comes before {target}")
        contract = name.startswith(CONTRACT)  # the interface every layer may read
        if sub in NO_MODELS and target in {"models", "callbacks"} and not contract:
            found.append(f"{module} imports {name}: {sub} must not depend on {target}")
        if sub == "nn" and (target == "models" or name.startswith("genlab.utils.checkpoint")):
            found.append(f"{module} imports {name}: nn must not depend on checkpoints or models")
        found += family_violations(module, name)
        dataset = rest.split(".")[1] if target == "data" and rest.count(".") else ""
        if sub in NO_DATASETS and dataset in DATASETS:
            found.append(f"{module} imports {name}: {sub} must not import a specific dataset")
    return found


def family_violations(module: str, name: str) -> list[str]:
    """A model family imports no other family: ``genlab.models.<family>`` may read the contract
    (the families' one shared base) and its own folder; every model module sits in a family."""
    parts = module.split(".")
    if parts[:2] != ["genlab", "models"] or len(parts) < 3:
        return []
    if parts[2] not in FAMILIES and parts[2] != "contract":
        return [f"{module}: a model module belongs in a family folder {sorted(FAMILIES)}"]
    target = name.split(".")
    if target[:2] != ["genlab", "models"] or len(target) < 3 or target[2] == "contract":
        if parts[2] == "contract" and name.startswith("genlab"):
            return [f"{module} imports {name}: the contract imports nothing from genlab"]
        return []
    if target[2] != parts[2]:
        return [f"{module} imports {name}: the {parts[2]} family must not import {target[2]}"]
    return []


SOURCES = sorted((SRC / "genlab").rglob("*.py")) + sorted(SRC.glob("*.py"))


def test_sources_are_found() -> None:
    names = {module_name(p) for p in SOURCES}
    assert {"genlab.utils.checkpoint", "genlab.callbacks.sample_grid", "train", "eval"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_import_rules(path: Path) -> None:
    module = module_name(path)
    imports = imported_modules(path.read_text(), module, path.name == "__init__.py")
    assert violations(module, imports) == []


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        (
            "genlab.nn.unet",
            "from genlab.models.diffusion.model import DiffusionModel",
            "nn comes before models",
        ),
        ("genlab.diffusion.samplers", "from ..callbacks import x", "diffusion comes before"),
        ("genlab.models.flows.glow", "def f():\n    import omegaconf", "only genlab.utils may"),
        ("genlab.data.shapes", "import genlab.models.ddpm", "data must not depend on models"),
        ("genlab.utils.images", "from genlab.models import ddpm", "utils must not depend"),
        ("genlab.callbacks.sample_grid", "import train", "imports the entry point"),
        ("genlab.nn.pretrained_text", "from genlab.utils.checkpoint import load", "nn must not"),
        (
            "genlab.nn.unet",
            "def f():\n    import genlab.models.evaluators.clip",
            "nn must not depend",
        ),
        ("genlab.callbacks.x", "from genlab.data.shapes import caption_cells", "specific dataset"),
        ("genlab.metrics.fid", "import genlab.data.coco", "must not import a specific dataset"),
        ("genlab.evaluation.measure", "from genlab.data import shapes", "specific dataset"),
        (
            "genlab.models.diffusion.model",
            "from genlab.models.autoencoders.vae import VAE",
            "the diffusion family must not import autoencoders",
        ),
        ("genlab.models.ddpm", "import torch", "belongs in a family folder"),
        ("genlab.models.contract", "from genlab.nn.unet import UNet", "imports nothing from"),
    ],
)
def test_checker_catches_violations(module: str, source: str, broken: str) -> None:
    found = violations(module, imported_modules(source, module))
    assert any(broken in v for v in found), found


def test_checker_allows_the_permitted_direction() -> None:
    allowed = "from genlab.nn.unet import UNet\nfrom ..diffusion import samplers\nimport torch"
    module = "genlab.models.diffusion.x"
    assert violations(module, imported_modules(allowed, module)) == []
    shared = "from genlab.models.contract import SamplingOptions\nfrom . import conditioners"
    assert violations(module, imported_modules(shared, module)) == []
    assert violations("genlab.utils.task", imported_modules("import omegaconf", "x")) == []
