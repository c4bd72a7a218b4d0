"""The test suite, laid out like the packages it tests (``tests/mishax_py``, ``tests/instrumentation``, ``tests/saes``).

A package, so that its sub-folders (``tests.saes``, ...) never shadow the real packages and pytest puts
the repository root on ``sys.path``. Shared helpers live in :mod:`tests.helpers`, shared fixtures in the
``conftest.py`` of the narrowest folder that uses them.
"""
