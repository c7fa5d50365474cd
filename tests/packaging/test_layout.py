"""The source layout: the top-level folders are importable only as `lowbit.*`, never as bare
packages that shadow installed ones, and editors resolve `lowbit.*` from the source tree alone.

`kernels` is also Hugging Face's package, which transformers >= 5.25 imports whenever it is
installed; a regular top-level `kernels/` folder of ours, with the checkout root on sys.path
(`python -m pytest`, `python -c` there), stood in for it and broke every transformers import."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("runtime", "kernels", "loaders", "server")


def _ours(file: str) -> bool:
    """Whether `file` lies in one of our top-level folders (the venv may live in the root too)."""
    return any(ROOT / name in Path(file).resolve().parents for name in FOLDERS)


def _run_in_root(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", FOLDERS)
def test_each_folder_is_a_namespace_portion_of_lowbit(name):
    assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes `import {name}` ours"
    link = ROOT / "lowbit" / name
    assert link.is_symlink() and link.resolve() == ROOT / name


def test_transformers_llama_imports_with_the_root_on_sys_path():
    """This process has the checkout root on sys.path (pytest's rootdir insertion)."""
    assert str(ROOT) in [str(Path(p).resolve()) for p in sys.path if p]
    from transformers import LlamaForCausalLM
    from transformers.integrations import hub_kernels  # imports `kernels` when it is installed

    assert LlamaForCausalLM.__module__.startswith("transformers.")
    kernels = sys.modules.get("kernels")
    if kernels is not None:
        assert not _ours(kernels.__file__)
    assert hub_kernels is not None


def test_python_in_the_root_imports_transformers_then_lowbit():
    out = _run_in_root(
        "import transformers.models.llama.modeling_llama\n"
        "import lowbit, lowbit.runtime.engine, lowbit.kernels.cpu.extension\n"
        "import kernels\n"
        "print(kernels.__file__)\n"
    )
    # The lock installs Hugging Face's `kernels` (transformers requires it): the bare name is theirs.
    importlib.metadata.distribution("kernels")
    assert not _ours(out.strip())


def test_bare_names_never_run_our_code():
    """With the root as working directory, `import runtime` etc. find at most an empty namespace
    (a regular package of that name anywhere on sys.path wins); no file of ours is its origin."""
    out = _run_in_root(
        "import importlib.util\n"
        f"for name in {FOLDERS!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec and spec.origin)\n"
    )
    for line in out.splitlines():
        _, origin = line.split(" ", 1)
        assert origin == "None" or not _ours(origin), line


def test_an_editor_resolves_lowbit_imports_without_an_install(tmp_path):
    """jedi (what editors use) on a copy of the tree, with an interpreter that has no lowbit."""
    jedi = pytest.importorskip("jedi")
    tree = tmp_path / "clone"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(".git", ".venv*", "build"))
    base = sys._base_executable
    probe = subprocess.run([base, "-c", "import lowbit"], cwd=tmp_path, capture_output=True, check=False)
    assert probe.returncode != 0, "the base interpreter has lowbit installed: not a clean check"
    environment = jedi.create_environment(base, safe=False)
    project = jedi.Project(tree, environment_path=base)
    cases = {
        "from lowbit.runtime.engine import Engine": "runtime/engine.py",
        "from lowbit.kernels.cpu.extension import load": "kernels/cpu/extension.py",
        "from lowbit.loaders.registry import load_checkpoint": "loaders/registry.py",
        "from lowbit.server.app import build_app": "server/app.py",
    }
    for code, target in cases.items():
        script = jedi.Script(code, path=tree / "probe.py", project=project, environment=environment)
        found = script.goto(1, len(code) - 1)
        assert found, code
        assert os.path.realpath(found[0].module_path) == str((tree / target).resolve()), code
