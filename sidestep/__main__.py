"""`python -m sidestep ...`, so torchrun and accelerate can launch the CLI."""

from sidestep.cli.app import main

if __name__ == "__main__":
    main()
