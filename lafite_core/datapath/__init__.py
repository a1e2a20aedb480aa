"""Images in and out: dataset discovery, bounded decoding, batched feature extraction, overlays."""
