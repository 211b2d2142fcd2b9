"""Ray Tune + Optuna sweep over the linear head on the frozen encoder."""
