"""A non-editable install works: the wheel holds every file the package reads, and, installed
outside the checkout, `LLM()` answers with the CPU ops compiled from the wheel's own sources, or
with one warning and the eager torch ops where they cannot be (no compiler, LOWBIT_CPU_OPS=0).

The reference for the answers is the checkout (editable install) on the same prompt, in fp32,
where the compiled and eager paths compute the same thing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lowbit.kernels.cpu import extension

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("lowbit", "runtime", "kernels", "loaders", "server")
PROGRAM = """
import json, sys
from pathlib import Path
import lowbit, lowbit.runtime.engine
from lowbit import LLM, SamplingParams
from lowbit.kernels.cpu import extension
llm = LLM(dtype="float32", kv_cache_memory=16 << 20)
out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=6))[0]
files = [lowbit.__file__, lowbit.runtime.engine.__file__, extension.__file__]
print(json.dumps({"files": files, "compiled": extension.load() is not None,
                  "tokens": out.outputs[0].token_ids}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps` on a copy of the tree (the build writes build/ and egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    tree = work / "src"
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, tree, symlinks=True, ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "--quiet", "-w", str(work)], check=True, cwd=work, timeout=600)
    (built,) = work.glob("lowbit-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    subprocess.run([*command, str(wheel)], check=True, timeout=600)
    return target


def _tracked_sources() -> list[str]:
    """Every tracked .py of the package, as the wheel names it (lowbit/<folder>/...)."""
    listed = subprocess.run(
        ["git", "ls-files", *FOLDERS], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return sorted(
        path if path.startswith("lowbit/") else f"lowbit/{path}"
        for path in listed
        if path.endswith(".py") and not (ROOT / path).is_symlink()
    )


def _build_inputs() -> set[str]:
    """The files the CPU ops build reads: its sources, its header, and whatever they include."""
    names = {*extension.SOURCES, extension.HEADER}
    for name in list(names):
        text = (extension.HERE / name).read_text()
        names.update(re.findall(r'#include\s+"([^"]+)"', text))
    return {f"lowbit/kernels/cpu/{name}" for name in names}


def test_the_wheel_holds_every_file_the_package_reads(wheel):
    files = set(zipfile.ZipFile(wheel).namelist())
    assert _build_inputs() <= files, sorted(_build_inputs() - files)
    missing = [path for path in _tracked_sources() if path not in files]
    assert not missing, missing
    assert not any(name.split("/")[0] in FOLDERS[1:] for name in files), "a bare top-level package"


def _answer(tmp_path: Path, site: Path | None, **env: str) -> tuple[dict, str]:
    """PROGRAM from a directory outside the checkout, importing lowbit from `site` (the wheel's
    install) or, with None, from the checkout's editable install."""
    environ = {**os.environ, **env}
    environ.pop("PYTHONPATH", None)
    if site is not None:
        environ["PYTHONPATH"] = str(site)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=tmp_path, env=environ, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _fresh_caches(tmp_path: Path, name: str) -> dict[str, str]:
    """No build from an earlier run or from the checkout can be found: each case starts cold."""
    return {
        "XDG_CACHE_HOME": str(tmp_path / name / "xdg"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / name / "ext"),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    result, _ = _answer(tmp_path_factory.mktemp("reference"), None)
    assert all(Path(file).resolve().is_relative_to(ROOT) for file in result["files"]), result["files"]
    return result


def _from_site(result: dict, site: Path) -> bool:
    return all(Path(file).resolve().is_relative_to(site.resolve()) for file in result["files"])


@pytest.mark.skipif(extension.load() is None, reason="no C++ compiler here: covered by the fallback tests")
def test_installed_wheel_builds_its_cpu_ops_and_answers(site, reference, tmp_path):
    result, _ = _answer(tmp_path, site, **_fresh_caches(tmp_path, "cold"))
    assert _from_site(result, site), result["files"]
    assert result["compiled"]
    assert result["tokens"] == reference["tokens"]


@pytest.mark.parametrize("env", [{"LOWBIT_CPU_OPS": "0"}, {"CXX": "false"}], ids=["disabled", "no-compiler"])
def test_installed_wheel_falls_back_with_one_warning(site, reference, tmp_path, env):
    result, stderr = _answer(tmp_path, site, **env, **_fresh_caches(tmp_path, "cold"))
    assert _from_site(result, site), result["files"]
    assert not result["compiled"]
    warnings = [line for line in stderr.splitlines() if "compiled CPU ops" in line]
    assert len(warnings) == 1, stderr[-3000:]
    assert result["tokens"] == reference["tokens"]
