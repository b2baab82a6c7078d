"""Training engine shared by all four tasks: trainer, checkpoints, schedules, distribution, logging."""
