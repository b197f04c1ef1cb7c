"""edge-lstm: LSTM forecasting for sensor streams on edge devices."""

__version__ = "0.1.0"
