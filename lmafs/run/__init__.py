"""One training run (trainLmAf.py's Trainer is the entry point), a module a room: flagChecks (the flags, settled
once), runPlan (pure: schedules, starts, due-predicates, passes), runSetup (device, data, model, optimizers),
forwardPasses, gradients, runState, runFiles (every file name), runOutputs and logLines (the log, metrics, plots),
checkpoints, stopping, distributed (torchrun), trackers, preflight."""
