"""Shared model code and stage contracts: embeddings, DLRM, the dataset format, the raw-row
Transform, metrics, the run format, the export spec and the model repository."""
