"""Runs: experiment variants, run files of evaluations, sweeps on Ray, drift / patch runs, the figures. The top layer below the command line."""
