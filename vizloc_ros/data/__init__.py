"""Datasets and the synthetic world."""
