"""Dependencies flow one way, and nothing in the core imports the lab.

The rule (A: the project modules A may import; every import counts, lazy ones inside functions too):

    mdm, bpe, fsq, sde_batch        nothing of the project (the math, the tokenizers, the batch rule)
    model                           mdm
    data                            mdm, bpe, fsq
    shards                          mdm, bpe, fsq, data
    checkpoint                      mdm, model, bpe, fsq, data
    distributed                     mdm, model
    sample                          mdm, model, data, checkpoint
    evaluate                        mdm, model, bpe, fsq, data, shards, checkpoint, sample
    train                           all of the above
    lab/*                           anything; no core module imports lab

So the core has no import cycle, reading a trained model never needs train.py, and the lab (the tools
that measure and choose) can change without touching the model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {p.stem for p in ROOT.glob("*.py")}
ALLOWED = {
    "mdm": set(),
    "bpe": set(),
    "fsq": set(),
    "sde_batch": set(),
    "model": {"mdm"},
    "data": {"mdm", "bpe", "fsq"},
    "shards": {"mdm", "bpe", "fsq", "data"},
    "checkpoint": {"mdm", "model", "bpe", "fsq", "data"},
    "distributed": {"mdm", "model"},
    "sample": {"mdm", "model", "data", "checkpoint"},
    "evaluate": {"mdm", "model", "bpe", "fsq", "data", "shards", "checkpoint", "sample"},
}
ALLOWED["train"] = set(ALLOWED) - {"train"}


def project_imports(source: str) -> set[str]:
    """Every project module (core or lab) that the source imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in CORE | {"lab"}}
    return found


def test_every_core_module_has_a_rule() -> None:
    assert set(ALLOWED) == CORE, "a new top-level module needs its place in the rule (this file's docstring)"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_core_imports_follow_the_rule(module: str) -> None:
    imported = project_imports((ROOT / f"{module}.py").read_text()) - {module}
    assert imported <= ALLOWED[module], f"{module}.py imports {sorted(imported - ALLOWED[module])}"


def test_the_checker_sees_lazy_and_lab_imports() -> None:
    lazy = "def f():\n    import train\n    from lab.bench import run\n    from evaluate import report\n"
    assert project_imports(lazy) == {"train", "lab", "evaluate"}
    assert not {"train", "lab"} <= ALLOWED["sample"], "so a lazy `import train` in sample.py would fail the rule"
