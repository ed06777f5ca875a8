"""Using a trained model: evaluate, predict, export, explain."""
