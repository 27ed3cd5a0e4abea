"""Policy tuning: one module per algorithm (SFT, REINFORCE, RLOO, PPO, DPO), each loss beside its equation."""
