"""What sam3d puts in front of MONAI Label 0.8.5's server, each part saying why: its own upload, infer, info and
train endpoints (``endpoints``), the browser guard (``browser_guard``), and the server's configuration and the
token fix (``configure``). Only the server imports this package; the offline scripts never do."""
