"""Test helpers for backend authors: the conformance suite every Backend must pass.

Kept out of the tests/ tree so a plugin installed elsewhere can import it
(``pip install secretfs[test]``); see backend_conformance for how to use it.
"""

from secretfs.testing.backend_conformance import BackendConformance, no_value_in_error, token

__all__ = ["BackendConformance", "no_value_in_error", "token"]
