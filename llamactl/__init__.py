"""llamactl: the Llama 2 / Llama 2-Chat training recipe as one toolkit."""

__version__ = "0.1.0"
