"""Model-side facts shared by fine-tuning and evaluation (pooling, heads)."""
