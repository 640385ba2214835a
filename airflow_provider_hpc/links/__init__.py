"""Links of the HPC provider."""
