"""``python -m lightning_peft fit --config ...``: the same as the ``lightning-peft`` console script."""

from lightning_peft.cli import main

if __name__ == "__main__":
    main()
