"""LafitE as a pure library (no Prefect, no Ray), in three parts and one chain of stages.

- ``method/``: the paper, one concept per file (backbone features 3.1, schedule and DDIM 3.2, U-Net
  and its training, coreset eq. 9, kNN and editing eq. 10, scores eq. 11-12, synthesis and search
  3.4/4.5, calibration, the trained model and its scorer, metrics).
- ``datapath/``: images in and out (dataset discovery, bounded decoding, read-ahead and batched
  extraction, heat-map overlays).
- ``store/``: persistence (the artefact store, every path in it, Zarr features, the batch-scoring
  ledger, Parquet tables).
- ``config`` (one frozen config), ``stages`` (the chain: plan, extract, train, select, publish,
  score, measure) and ``pipeline`` (their in-process composition: fit, evaluate, publish).
"""
