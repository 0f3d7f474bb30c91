"""Training: fine-tuning the offline benchmark's task models."""
