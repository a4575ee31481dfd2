"""Flower ClientApp: load this node's data, distill it (or run a FedAvg step), reply."""
