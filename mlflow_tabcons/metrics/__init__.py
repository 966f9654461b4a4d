"""Pure metric functions in the scikit-learn style: per-model scores and multiplicity across a seed ensemble."""
