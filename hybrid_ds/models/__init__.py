"""Models: the policy/value model around a Hugging Face causal LM, loading and saving."""
