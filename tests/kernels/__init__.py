"""Tests of fssam_deploy.kernels (a package, so that its conftest does not shadow tests/conftest.py)."""
