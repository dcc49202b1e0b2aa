"""melrecon's Optuna sweeper: Hydra's, refusing to continue a study with another fixed config."""
