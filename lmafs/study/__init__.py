"""Many runs (compareAfs.py is the entry point): the plan of a comparison, its statistics and report, and where its
runs train: scheduler (this machine's CPU slots or GPUs) or slurmJobs (a Slurm cluster, through submitit)."""
