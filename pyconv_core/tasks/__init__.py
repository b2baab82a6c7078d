"""Per-task step and evaluation functions plugged into the one Trainer."""
