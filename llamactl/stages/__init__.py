"""One module per recipe stage: its data, loss and metrics; the loop itself is trainer.py."""
