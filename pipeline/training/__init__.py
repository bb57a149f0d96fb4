"""Training: config, data, models' parallel application (via pipeline/distributed), the loop."""
