"""``python -m diffstategrad.training ...``: the trainer's command line (``cli.py``)."""

from diffstategrad.training.cli import main

if __name__ == "__main__":
    main()
