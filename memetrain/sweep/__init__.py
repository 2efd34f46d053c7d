"""Sweeps: grids of runs over seeds, and the collector that turns their results into tables."""
