"""RLHF: rejection-sampling fine-tuning and PPO with a KL penalty (Llama 2 §3.2.3, Ziya)."""
