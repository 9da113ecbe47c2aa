"""Visual-token pruning: scoring signals, deterministic budgeted top-k, and the stage-wise baselines."""
