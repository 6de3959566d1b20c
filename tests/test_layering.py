"""The package layering: lower packages never import higher ones, so there is no import cycle between them.

    common  <-  diffusion  <-  ddim  <-  ldm;  common  <-  quant  <-  hf;  all  <-  evaluation  <-  experiments
    <-  tools  <-  studies, scripts

(diffusion: the samplers and the sampling pipeline every family shares; hf: diffusers networks, wrapped for the
core; ldm builds its first stage from ddim's blocks; quant never imports a model package: it reaches models
through adapters registered by class path; evaluation may read the offline datasets of ddim/ldm.)
"""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

ALLOWED = {
    "common": set(),
    "diffusion": {"common"},
    "hf": {"common", "quant"},
    "ddim": {"common", "diffusion"},
    "ldm": {"common", "diffusion", "ddim"},
    "quant": {"common"},
    "evaluation": {"common", "diffusion", "ddim", "ldm"},
    "experiments": {"common", "diffusion", "ddim", "ldm", "hf", "quant", "evaluation"},
    "tools": {"common", "diffusion", "ddim", "ldm", "hf", "quant", "evaluation", "experiments"},
    "studies": {"common", "diffusion", "ddim", "ldm", "hf", "quant", "evaluation", "experiments", "tools"},
    "scripts": {"common", "diffusion", "ddim", "ldm", "hf", "quant", "evaluation", "experiments", "tools"},
}

def imported_packages(path: Path) -> set[str]:
    """Top-level packages of this repo that a file imports (anywhere in it, lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_lower_layers(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert bad == {}, f"{package} imports higher layers: {bad}"


def test_the_layering_has_no_cycle():
    """The allowed graph itself is acyclic (so the test above rules out every import cycle between packages)."""
    order, seen = [], set()

    def visit(p, stack=()):
        assert p not in stack, f"cycle {stack + (p,)}"
        if p not in seen:
            for q in ALLOWED[p]:
                visit(q, stack + (p,))
            seen.add(p)
            order.append(p)
    for p in ALLOWED:
        visit(p)
    assert len(order) == len(ALLOWED)


@pytest.mark.parametrize("package", ["common", "diffusion", "ddim", "ldm", "hf", "quant", "evaluation"])
def test_library_packages_never_parse_command_lines(package):
    """Command lines are parsed by the entry points (scripts/, tools/, experiments/): the library never imports
    argparse, so nothing in it can depend on a Namespace."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] == "argparse" for n in names):
                bad.append(str(path.relative_to(ROOT)))
    assert bad == [], f"library modules importing argparse: {bad}"
