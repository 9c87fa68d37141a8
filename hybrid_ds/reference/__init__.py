"""The frozen reference model on its own ranks: the log-prob protocol and the serving loop."""
