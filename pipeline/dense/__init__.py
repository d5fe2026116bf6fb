"""Dense: per-view depth (stereo, PatchMatch, learned mono depth aligned to SfM), fused into one cloud."""
