"""The CPU allocator regime of a benchmark: glibc tunables that must be set before the process
allocates anything, so the script re-executes itself with them (not imported by torch code)."""

import os
import sys


def reexec_with_glibc_tunables(tunables: str) -> None:
    """Re-executes this script with GLIBC_TUNABLES=tunables on Linux, unless GLIBC_TUNABLES is
    already set or --default-allocator is given (the CSV records the setting as malloc_env)."""
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ and "--default-allocator" not in sys.argv:
        os.environ["GLIBC_TUNABLES"] = tunables
        os.execv(sys.executable, [sys.executable, *sys.argv])
