"""pyproject.toml's version floors hold every API in NEEDS: an install at the floors must not crash on them.

Each entry names an API XLab's code uses (the test finds it there) and the first release of its package that has
it. The test looks the API up in the installed package, so the table cannot name one that does not exist, and
checks that the floor in pyproject.toml is at least that release. The releases were read from the packages
themselves when the entry was written (datasets 3.6.0 has no `List`, 4.0.0 has; lightning 2.2.5 has no
`instantiate_module`, 2.3.0 has; torch 2.6 added `get_total_norm`, 2.4 `nn.RMSNorm`). No install at the floors
is run: the suite at the floors is not tested.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

NEEDS = [  # (distribution, module, attribute, first release that has it)
    ("torch", "torch.nn.utils", "get_total_norm", "2.6"),
    ("torch", "torch.nn", "RMSNorm", "2.4"),
    ("datasets", "datasets", "List", "4.0"),
    ("lightning", "lightning.pytorch.cli", "instantiate_module", "2.3"),  # rebuilds saved hyperparameters
]


def floors() -> dict[str, Version]:
    """The `>=` version of each runtime dependency in pyproject.toml."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = {}
    for line in dependencies:
        requirement = Requirement(line)
        found[requirement.name] = min((Version(s.version) for s in requirement.specifier if s.operator == ">="),
                                      default=Version("0"))
    return found


@pytest.mark.parametrize("distribution, module, attribute, first", NEEDS, ids=[n[2] for n in NEEDS])
def test_each_floor_has_the_apis_the_code_uses(distribution, module, attribute, first):
    assert hasattr(importlib.import_module(module), attribute), f"{module}.{attribute} does not exist"
    usage = f"{module.rsplit('.', 1)[-1]}.{attribute}"  # as the code writes it: utils.get_total_norm, nn.RMSNorm
    assert any(usage in file.read_text() for file in Path(ROOT, "xlab").glob("*.py")), f"xlab does not use {usage}"
    floor = floors()[distribution]
    assert floor >= Version(first), f"pyproject.toml allows {distribution}>={floor}, but {usage} needs {first}"
