"""Persistence: the artefact store, its layout, Zarr features, the score ledger, Parquet tables."""
