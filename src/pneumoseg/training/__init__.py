"""Training: the training engine and one fold's run (fit), with its out-of-fold predictions."""
