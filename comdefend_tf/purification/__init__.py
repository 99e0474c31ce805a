"""Purifying files and datasets: the local command's core and the Beam pipeline."""
