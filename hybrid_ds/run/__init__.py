"""The run: setup, the loop over phases, checkpoints and resume, metrics, outputs, the report."""
