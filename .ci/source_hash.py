"""Prints a hash of everything the compiled extension is built from (csrc/**, setup.py): what a
prebuilt library is checked against where file times do not survive a transfer (the GPU machines)."""

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
digest = hashlib.sha256()
for path in sorted([*(ROOT / "csrc").rglob("*"), ROOT / "setup.py"]):
    if path.is_file():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
print(digest.hexdigest())
