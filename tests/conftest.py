import os

# Quiet TensorFlow's C++ start-up lines before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from hypothesis import settings  # noqa: E402

# Same examples on every run (nothing flaky in CI), and no example database left on disk.
settings.register_profile("book", derandomize=True, database=None, print_blob=True)
settings.load_profile("book")
