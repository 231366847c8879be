"""Prints, one per line, the arguments that give `uv pip install` the package sources pip is configured
with here (uv does not read pip's configuration): find-links, index-url, extra-index-url and
constraint, from `pip config list` (pip.conf files and PIP_* variables). Then
`--index-strategy unsafe-best-match`, so that uv picks the best version across all of them, as pip
does (uv's default takes a package from the first index that has it). A `cert` setting is printed as
`SSL_CERT_FILE=<path>` on a line of its own, for the caller to export (uv's variable for it).

    python .ci/uv_index_args.py        # run by .ci/setup_env.sh with the venv's Python
"""

from __future__ import annotations

import ast
import subprocess
import sys

# pip's key -> uv's option; keys whose values are lists take each whitespace-separated item.
OPTIONS = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "constraint": "--constraint",
           "index-url": "--index-url"}


# pip's configuration origins, the one that overrides the others first (pip lists them sorted by name).
PRECEDENCE = (":env:", "site", "user", "global")


def settings(listing: str) -> dict[str, list[str]]:
    """pip config list's lines `<origin>.<key>='<value>'`: every value of each key, each once, those of
    the origin that takes precedence first."""
    lines = []
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            origin, _, key = name.rpartition(".")
            rank = PRECEDENCE.index(origin) if origin in PRECEDENCE else len(PRECEDENCE)
            lines.append((rank, key, value))
    found: dict[str, list[str]] = {}
    for _, key, value in sorted(lines, key=lambda entry: entry[0]):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        for item in str(value).split():
            if item not in found.setdefault(key, []):
                found[key].append(item)
    return found


def uv_arguments(found: dict[str, list[str]]) -> list[str]:
    args = []
    for key, option in OPTIONS.items():
        values = found.get(key, [])
        if key == "index-url":
            values = values[:1]  # one index replaces PyPI: the one of highest precedence
        for value in values:
            args += [option, value]
    args += ["--index-strategy", "unsafe-best-match"]
    if found.get("cert"):
        args.append(f"SSL_CERT_FILE={found['cert'][0]}")
    return args


if __name__ == "__main__":
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    print("\n".join(uv_arguments(settings(listing))))
