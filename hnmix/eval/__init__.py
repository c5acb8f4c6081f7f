"""Evaluation of frozen features: linear classification and kNN."""
