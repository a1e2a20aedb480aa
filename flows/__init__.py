"""Prefect flows that chain the tasks: train (nightly retraining), evaluate, batch_score."""
