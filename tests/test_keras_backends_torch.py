"""mha.keras's Keras tests rerun on Keras's torch backend (see tests/test_keras_backends.py).

A file of its own so that `make test`, which hands whole files to its workers, runs it beside the
JAX run instead of after it.
"""

from test_keras_backends import run_on_backend


def test_keras_tests_pass_on_torch():
    run_on_backend("torch")
