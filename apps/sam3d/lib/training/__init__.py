"""Training without a server: the simulated user, augmentation, the resumable DistributedDataParallel loop,
evaluation by the challenge's protocol and a run's job (no MONAI Label; the train task,
lib/trainers/sam3d_trainer.py, and scripts/train.py drive it)."""
