"""Training phases (SFT, PPO) as step functions, with their pure math beside them."""
