"""The demo: the whole pipeline on the synthetic data set, and which outputs are the demo's own."""
