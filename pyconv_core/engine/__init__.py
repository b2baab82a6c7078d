"""Training engine shared by all four tasks: trainer, checkpoints, run-folder files, schedules, distribution,
logging."""
