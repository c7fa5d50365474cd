"""Loading the compiled CPU ops: a library built once is imported directly afterwards, without
torch's cpp_extension (and the setuptools it imports); a missing or broken note means a rebuild."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lowbit.kernels.cpu import extension

pytestmark = pytest.mark.skipif(extension.load() is None, reason="no C++ compiler: the eager path is used")


def test_a_built_library_loads_without_cpp_extension():
    code = (
        "import sys\n"
        "from lowbit.kernels.cpu import extension\n"
        "ops = extension.load()\n"
        "assert ops is not None and hasattr(ops, 'paged_prefill_attention')\n"
        "print('torch.utils.cpp_extension' in sys.modules, 'setuptools' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_the_note_names_the_loaded_library():
    assert extension._index(extension._build_name()).read_text() == extension.load().__file__


def test_a_missing_or_wrong_library_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    name = extension._build_name()
    assert extension._load_built(name) is None  # no note
    note = extension._index(name)
    note.parent.mkdir(parents=True)
    note.write_text(str(tmp_path / "gone.so"))
    assert extension._load_built(name) is None  # a note whose library is gone
    note.write_text(str(note))  # not a shared library
    assert extension._load_built(name) is None


def test_without_a_cache_directory_nothing_is_noted(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(extension.Path, "home", no_home)
    assert extension._index("x") is None
    assert extension._load_built("x") is None


def test_other_compiler_flags_name_another_build(monkeypatch):
    """A noted library is imported without torch's rebuild check, so the flags must be in the name."""
    name = extension._build_name()
    monkeypatch.setattr(extension, "CFLAGS", [*extension.CFLAGS, "-DLOWBIT_TEST_FLAG"])
    assert extension._build_name() != name
