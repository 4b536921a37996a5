"""Phase 2, training and evaluation: data, recipes, the training loop, evaluation and curves."""
