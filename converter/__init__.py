"""Offline converter: train an LSTM forecaster and export a one-step TFLite model with explicit state."""
