"""Reading finished runs: `compare` (its statistics, audit and rows), the report and plots, and `bridgectl runs`."""
