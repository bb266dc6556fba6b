"""Flax (nnx) models: the IF-style UNet, the T5 v1.1 encoder and shared layers."""
