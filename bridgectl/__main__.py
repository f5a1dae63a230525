"""`python -m bridgectl`: the same as the `bridgectl` command (for environments without its script on PATH, and
for launchers that take a module, as `torchrun -m bridgectl run ...`)."""

from bridgectl.cli.app import main

if __name__ == "__main__":
    main()
