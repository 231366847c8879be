"""The CI setup's tooling: .ci/uv_index_args.py passes pip's package sources on to uv; setup_env.sh
takes a prebuilt library only where it is the one recorded."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
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


def test_prebuilt_library_used_only_when_it_is_the_one_recorded(tmp_path):
    """build/prebuilt-gpu.sources held the sources' hash alone: any library of this Python's name was
    then taken as the prebuilt one (a stale build passed for it). It now names the library's sha256 too;
    this checks the matching case, where set-up must use the library as is (no build)."""
    so = ROOT / "batchless_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not so.is_file():
        pytest.skip("no in-place build of the extension for this Python")
    sources = subprocess.run([sys.executable, str(ROOT / ".ci" / "source_hash.py")], capture_output=True, text=True,
                             check=True).stdout.strip()
    record = tmp_path / "prebuilt.sources"
    record.write_text(f"{sources}\n{hashlib.sha256(so.read_bytes()).hexdigest()}\n")
    env = {**os.environ, "PYTHON": sys.executable, "BATCHLESS_VENV": "0", "BATCHLESS_PREBUILT": str(record)}
    done = subprocess.run(["bash", "-c", "source .ci/setup_env.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"using the prebuilt {so.name}" in done.stdout, done.stdout[-2000:]
