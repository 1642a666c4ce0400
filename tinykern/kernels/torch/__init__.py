"""The plain-torch reference implementations: the "torch" backend and the tests' oracle."""

from tinykern.kernels.torch import blocks, rvq  # noqa: F401  (they register themselves)
