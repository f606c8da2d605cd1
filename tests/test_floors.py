"""pyproject.toml's version floors hold every API in NEEDS: an install at the floors must not crash on them.

Each entry names an API XLab's code uses (the test finds it there, as the code writes it) and the first release of
its package that has it. The test looks the API up in the installed package, so the table cannot name one that does
not exist, and checks that the floor in pyproject.toml is at least that release. The releases were read from the
packages' own wheels when the entry was written (datasets 3.6.0 has no `List`, 4.0.0 has; lightning 2.3.0 is the
first with `instantiate_module`, 2.5.5 the first whose CLI calls `_parse_ckpt_path`; torch 2.6 added
`get_total_norm`, 2.4 `nn.RMSNorm`; tokenizers 0.21 `encode_batch_fast`). The suite itself is run at the installed
versions only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

NEEDS = [  # (distribution, module, attribute, first release that has it, the code's use of it)
    ("torch", "torch.nn.utils", "get_total_norm", "2.6", "torch.nn.utils.get_total_norm("),
    ("torch", "torch.nn", "RMSNorm", "2.4", "nn.RMSNorm("),
    ("datasets", "datasets", "List", "4.0", "datasets.List("),
    ("tokenizers", "tokenizers", "Tokenizer.encode_batch_fast", "0.21", ".encode_batch_fast("),
    # rebuilds the saved hyperparameters of a LanguageModel made in Python
    ("lightning", "lightning.pytorch.cli", "instantiate_module", "2.3", '"lightning.pytorch.cli.instantiate_module"'),
    # XLabCLI overrides it to take the architecture from --ckpt_path; an older LightningCLI never calls it
    ("lightning", "lightning.pytorch.cli", "LightningCLI._parse_ckpt_path", "2.5.5", "def _parse_ckpt_path("),
]


def lower_bound(requirement: Requirement) -> Version:
    return max((Version(s.version) for s in requirement.specifier if s.operator == ">="), default=Version("0"))


def floors() -> dict[str, Version]:
    """The `>=` version of each runtime dependency in pyproject.toml."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {requirement.name: lower_bound(requirement) for requirement in map(Requirement, dependencies)}


@pytest.mark.parametrize("distribution, module, attribute, first, usage", NEEDS, ids=[n[2] for n in NEEDS])
def test_each_floor_has_the_apis_the_code_uses(distribution, module, attribute, first, usage):
    target = importlib.import_module(module)
    for name in attribute.split("."):
        assert hasattr(target, name), f"{module}.{attribute} does not exist"
        target = getattr(target, name)
    assert any(usage in file.read_text() for file in Path(ROOT, "xlab").glob("*.py")), f"xlab does not use {usage}"
    floor = floors()[distribution]
    assert floor >= Version(first), f"pyproject.toml allows {distribution}>={floor}, but {attribute} needs {first}"


def test_jsonargparse_floor_meets_what_lightnings_cli_declares():
    """XLab lists jsonargparse itself rather than lightning's `pytorch-extra` extra, so it must ask for at least what
    that extra does (4.39 since lightning 2.5.5: older releases lack what its CLI calls). Read from the installed
    lightning, whose requirement is at least its floor release's."""
    extra = [Requirement(r) for r in importlib.metadata.requires("lightning") if r.startswith("jsonargparse")]
    needed = max(lower_bound(r) for r in extra if r.marker and r.marker.evaluate({"extra": "pytorch-extra"}))
    assert floors()["jsonargparse"] >= needed, f"lightning's CLI needs jsonargparse>={needed}"


def test_lightning_is_bounded_to_the_releases_its_private_loop_state_was_tested_with():
    """xlab/loops.py reads and rewrites Lightning's private loop state, which changes between releases: pyproject.toml
    caps lightning, and the installed release (the one the suite tests) is within the cap."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [lightning] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "lightning"]
    assert any(s.operator == "<" for s in lightning.specifier)
    assert importlib.metadata.version("lightning") in lightning.specifier
