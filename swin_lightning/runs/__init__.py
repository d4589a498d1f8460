"""Runs of an ablation: specs (:mod:`.spec`), their state read from the run folders
(:mod:`.store`), one training attempt (:mod:`.attempt`) and the launchers that start attempts
here or on SLURM (:mod:`.launchers`)."""
