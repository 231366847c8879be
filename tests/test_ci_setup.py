"""The CI setup's tooling: .ci/uv_index_args.py passes pip's package sources on to uv; setup_env.sh
takes a prebuilt library only where it is the one recorded."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("uv_index_args", ROOT / ".ci" / "uv_index_args.py")
uv_index_args = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_index_args)


def test_pip_settings_become_uv_arguments():
    listing = "\n".join([
        ":env:.find-links='/opt/wheels'",
        ":env:.index-url='https://mirror.example/simple'",
        "global.cert='/etc/ssl/certs/ca.crt'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
        "global.find-links='/opt/wheels'",
        "global.index-url='https://pypi.org/simple'",
        "global.timeout='60'",
        "user.index-url='https://user.example/simple'",
    ])
    args = uv_index_args.uv_arguments(uv_index_args.settings(listing))
    assert args == ["--find-links", "/opt/wheels",  # once, though pip lists it twice
                    "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                    "--constraint", "/etc/xdg/pip/constraints.txt",
                    "--index-url", "https://mirror.example/simple",  # the environment's, then user's: pip's precedence
                    "--index-strategy", "unsafe-best-match",
                    "SSL_CERT_FILE=/etc/ssl/certs/ca.crt"]


def test_no_pip_settings_leave_uv_its_defaults():
    assert uv_index_args.uv_arguments(uv_index_args.settings("")) == ["--index-strategy", "unsafe-best-match"]


def test_user_settings_override_global_ones():
    listing = "global.index-url='https://global.example/simple'\nuser.index-url='https://user.example/simple'"
    assert uv_index_args.uv_arguments(uv_index_args.settings(listing))[:2] == ["--index-url", "https://user.example/simple"]


@pytest.mark.parametrize("recorded", ["this library", "another library"])
def test_prebuilt_library_used_only_when_it_is_the_one_recorded(tmp_path, recorded):
    """build/prebuilt-gpu.sources held the sources' hash alone: any library of this Python's name was
    then taken as the prebuilt one (a stale build passed for it). It now names the library's sha256
    too. Run on a copy of the build's inputs (file times kept: the library is newer than its sources,
    so a refused prebuild falls back on it without building), the package imported from there."""
    so_name = f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not (ROOT / "batchless_kernels" / so_name).is_file():
        pytest.skip("no in-place build of the extension for this Python")
    repo = tmp_path / "repo"
    for part in (".ci", "csrc", "batchless_kernels"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "setup.py", repo / "setup.py")
    so = repo / "batchless_kernels" / so_name
    sources = subprocess.run([sys.executable, str(repo / ".ci" / "source_hash.py")], capture_output=True, text=True,
                             check=True).stdout.strip()
    digest = hashlib.sha256(so.read_bytes()).hexdigest() if recorded == "this library" else "0" * 64
    record = tmp_path / "prebuilt.sources"
    record.write_text(f"{sources}\n{digest}\n")
    env = {**os.environ, "PYTHON": sys.executable, "BATCHLESS_VENV": "0", "BATCHLESS_PREBUILT": str(record),
           "PYTHONPATH": str(repo)}
    done = subprocess.run(["bash", "-c", "source .ci/setup_env.sh"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "building batchless_kernels._C" not in done.stdout, done.stdout[-2000:]
    if recorded == "this library":
        assert f"using the prebuilt {so_name}" in done.stdout, done.stdout[-2000:]
    else:
        assert f"{so_name} is not the library {record} names" in done.stdout, done.stdout[-2000:]
