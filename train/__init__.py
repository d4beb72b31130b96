"""WithAnyone trainer: python train/run.py --config FILE (see README, Training)."""
