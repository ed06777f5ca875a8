"""Several trained models made into one: ensembles (probabilities averaged) and weight soups (weights averaged)."""
