"""Speed and memory benchmarks (training-step time, peak RSS) of peftvision methods."""
