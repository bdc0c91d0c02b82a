"""Local runs of fedtune on Flower's Simulation Engine, baselines, reports and benchmarks."""
