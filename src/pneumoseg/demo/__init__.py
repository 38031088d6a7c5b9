"""The demo: the whole pipeline on the synthetic data set, and which outputs are the demo's own."""

from pneumoseg.demo.run import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
