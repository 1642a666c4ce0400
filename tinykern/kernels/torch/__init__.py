"""The plain-torch reference implementations: the "torch" backend and the tests' oracle."""

from tinykern.kernels.torch import q4k, q8_0, rvq  # noqa: F401  (they register themselves)
