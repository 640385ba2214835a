"""Hooks of the HPC provider."""
