"""The MLflow jobs: train an ensemble, evaluate, calibrate, resume, register; what they log and where."""
