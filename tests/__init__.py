"""The test suite: one package per stage of ``pipeline/`` plus ``workflow`` and ``bench``; shared helpers in ``tests.support``, fixtures in ``tests/conftest.py``."""
