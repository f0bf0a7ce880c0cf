"""Serving without a server: crop planning, following large lesions, stitching and the caches (no MONAI Label; the
infer task, lib/infers/sam3d_infer.py, drives it)."""
