"""The CI setup's tooling: .ci/uv_index_args.py passes pip's package sources on to uv."""

from __future__ import annotations

import importlib.util
import pathlib

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
