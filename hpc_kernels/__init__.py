"""hpc-kernels: sandboxed Jupyter kernels on Slurm compute nodes, reached through a socket relay."""

__version__ = "0.1.0"
