"""Semantic segmentation, in the lecture's order: sliding window -> full-resolution FCN -> encoder-decoder."""
