"""Post-processing: thresholds, minimum areas and the triplet rule, and their search on OOF maps."""
