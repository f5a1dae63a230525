"""Starting runs in several processes: torchrun on one or more nodes, and SLURM or local jobs through submitit."""
