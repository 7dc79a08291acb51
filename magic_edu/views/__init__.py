"""Pictures of a decode: plots drawn from a trace alone, and the Jupyter widgets."""
