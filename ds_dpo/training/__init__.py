"""The run: the recipe's loop, its state, reference, metrics, checkpoints and export."""
