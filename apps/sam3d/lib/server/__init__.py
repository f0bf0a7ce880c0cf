"""What sam3d puts in front of MONAI Label 0.8.5's server, each part saying why: its own upload, infer, info and
train endpoints (``endpoints``), the browser guard (``browser_guard``), and the server's configuration and the
token fix (``configure``). The server and its settings import this package; the offline scripts (train.py,
evaluate.py) never do (tests/test_lint.py)."""
