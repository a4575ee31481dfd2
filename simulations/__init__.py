"""Experiment drivers: compare vs FedAvg, privacy-utility sweeps, benchmarks."""
