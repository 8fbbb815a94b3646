"""Built-in exporters: send what the kernel observes somewhere else."""
