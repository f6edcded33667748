"""Development tools that users of the sampler do not need: the benchmark report and the layer-shape
finders that tests and benchmarks share. Nothing in the library imports this package."""
