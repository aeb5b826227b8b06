"""`python -m lmms_adaptive.train`: GRPO training of the two-stage controller (see `lmms_adaptive.tools.train`)."""

from lmms_adaptive.tools.train import main

if __name__ == "__main__":
    main()
