"""Shared model code: embeddings, DLRM, datasets, metrics and the run format."""
