"""`python -m fastllm ...` is the `fastllm` command (also what torchrun runs: `torchrun -m fastllm pretrain`)."""
import sys

from fastllm.cli import main

sys.exit(main())
