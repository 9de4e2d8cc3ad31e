"""Training: the run's assembly, the loop and its resumable state, the jobs, checkpoints, phases and signals."""
