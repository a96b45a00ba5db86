"""Post-pretraining stages (SFT, DPO, reward model): each is a data pipeline plus a loss."""
