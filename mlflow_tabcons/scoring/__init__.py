"""The consistency score S of one model: neighbours in embedding space, confidence bounds, certificates, backends."""
