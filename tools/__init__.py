"""Developer tools run from a checkout (not packaged): generators of the docs and README parts
that come from the code."""
