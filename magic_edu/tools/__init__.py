"""Tools around the library: the command line, benchmark, evaluation, analysis, stand-in models."""
