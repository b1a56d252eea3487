"""Dense captioning: region detection with a language model per region (DenseCap)."""
