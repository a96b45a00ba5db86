"""`RUN/ppo.png`: a PPO run's reward, KL and response length (and R_h, R_s) per iteration."""
from __future__ import annotations


def plot_history(history, path) -> None:
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["reward", "kl", "response_length"] + (["reward_help", "reward_safety"] if "reward_safety" in history[0]
                                                   else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    steps = [h["iteration"] for h in history]
    for ax, key in zip(axes, keys):
        ax.plot(steps, [h[key] for h in history])
        ax.set_title(key)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    from jaxllm import storage
    with storage.open(path, "wb") as f:  # a local file or an object in a bucket
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
