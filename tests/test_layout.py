"""The architecture's rules that a grep can check: docs/design.md names every module (and only
modules that exist), parallel/ imports nothing from runtime/, kernels are chosen in runtime/ops.py
alone, and nothing in the project points outside the repository."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "parallel", "launch")


def modules() -> set[str]:
    """Every Python module of the packages, as a repository path (package __init__ files aside)."""
    return {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
            if p.name != "__init__.py"}


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.splitlines()]


def test_design_names_every_module_and_only_existing_ones():
    design = (REPO / "docs" / "design.md").read_text()
    named = set(re.findall(r"`((?:runtime|parallel|launch)/[\w/]+\.py)`", design))
    assert named, "docs/design.md names no module"
    assert sorted(named - modules()) == [], "docs/design.md names modules that do not exist"
    assert sorted(modules() - named) == [], "modules that docs/design.md does not name"


def test_parallel_imports_nothing_from_runtime():
    for path in (REPO / "parallel").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (runtime|launch)\b", text, re.M), path


def test_kernels_are_chosen_in_ops_alone():
    """Only runtime/ops.py (and the kernels themselves) import a Triton kernel module in the runtime."""
    for path in [*(REPO / "runtime").glob("*.py"), *(REPO / "parallel").glob("*.py"),
                 *(REPO / "launch").glob("*.py")]:
        if path.name == "ops.py":
            continue
        assert not re.search(r"runtime\.kernels\.\w+_triton\b", path.read_text()), path


def test_nothing_points_outside_the_repository():
    """A user's clone has only the repository: the team's folder beside it is not there."""
    outside = "../" + "shared"  # spelled apart, so this file does not match itself
    for path in tracked("*.py", "*.md", "*.yaml", "*.toml", "*.sh", "*.sbatch"):
        assert outside not in path.read_text(errors="replace"), path
