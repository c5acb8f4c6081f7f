"""What hard negatives did to the feature space: uniformity, alignment, false negatives, hardness, ..."""
