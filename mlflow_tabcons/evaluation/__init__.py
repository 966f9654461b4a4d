"""Testing the measure against the truth of a seed ensemble: ground truth, measure quality, baselines."""
