"""Repairing a model after layers are removed: a linear map per removed run, fitted by least
squares on calibration activations and folded into the MLP output projection of the kept
layer in front of the run (ReplaceMe's idea), so the model keeps its architecture and its
parameter count."""
