"""`python -m ddpm_fast ...` is the `ddpm-fast` command."""
import sys

from .cli import main

sys.exit(main())
