"""Flower ServerApp and strategies: collect, validate and pool summaries; the FedAvg baseline."""
