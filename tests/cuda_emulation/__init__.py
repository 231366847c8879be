"""CUDA emulation for the test suite: see build.py."""
