"""The paper's evaluation: matching and metrics, scoring of any system's records, evaluation of a
bundle over a split, text similarity. Imports only the runtime and the core."""
