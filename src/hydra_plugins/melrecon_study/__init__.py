"""melrecon's Hydra plugins: the study run-list sweeper (run_list_sweeper.py)."""
