"""`python -m llamactl` (also what torchrun launches)."""
from llamactl.cli import main

main()
